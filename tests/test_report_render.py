"""One document, two renderings: the blocks in markdown and HTML, the three report writers, and a browser.

The browser test (`-m real`) is what caught the original bugs: raw ``**bold**`` and ``> note:`` in the
page and a row of figures wider than the window are only visible once a browser lays the page out.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_lab_report import write_thinking_patterns  # tests/ is on sys.path (pytest rootdir conftest)

from opd.analysis.analyze import load_run, write_analysis
from opd.lab.report import build_report
from opd.report.bins import bin_labels, bin_ranges
from opd.report.doctor import write_doctor_report
from opd.report.render import (
    Bullets,
    Figure,
    Figures,
    Heading,
    Note,
    Paragraph,
    Table,
    code,
    esc,
    inline_html,
    to_html,
    to_markdown,
)

DOC = [
    Heading("Report <b>title</b>", 1),
    Paragraph("Some **bold** text, `code <x>` and a [link](other/page.html); <script>alert(1)</script>."),
    Bullets(["first **item**", "second `item`"]),
    Table(
        ["metric", "a | b"], [["overlap", "0.9"], ["status", "reproduced"]], colours={"reproduced": "#1a7f37"}
    ),
    Note("the budget was hit"),
    Figures([Figure("figs/one.png", "first plot"), Figure("two.png", "second <plot>")]),
    Heading("Sub section", 3),
]


class _Text(HTMLParser):
    """The text a browser would show (script and style contents excluded), one string per text node."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(page: str) -> str:
    parser = _Text()
    parser.feed(page)
    return "\n".join(parser.parts)


def markdown_left(text: str) -> list[str]:
    """Markdown syntax that should have been converted: what a reader must never see in a page."""
    found = []
    if "**" in text:
        found.append("**")
    if "`" in text:
        found.append("backtick")
    if "![" in text:
        found.append("image syntax")
    if re.search(r"\[[^\]]*\]\([^)]*\)", text):
        found.append("link syntax")
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("> "):
            found.append(f"blockquote: {s[:40]}")
        if s.startswith("|") or re.match(r"^\|?\s*-{3,}\s*\|", s) or s.startswith("#"):
            found.append(f"table/heading syntax: {s[:40]}")
    return found


# ----------------------------------------------------------------------------------------------------
# The renderers


def test_every_block_in_markdown() -> None:
    md = to_markdown(DOC)
    assert md.startswith("# Report <b>title</b>\n\n")
    assert "Some **bold** text, `code <x>` and a [link](other/page.html)" in md
    assert "- first **item**\n- second `item`\n" in md
    assert "| metric | a \\| b |\n| --- | --- |\n| overlap | 0.9 |\n| status | reproduced |\n" in md
    assert "> note: the budget was hit\n" in md
    assert "![first plot](figs/one.png)\n\n![second <plot>](two.png)" in md
    assert "### Sub section" in md
    assert to_markdown([Heading("a"), Figures([]), Heading("b")]) == "## a\n\n## b\n"  # nothing to show


def test_every_block_in_html() -> None:
    page = to_html(DOC, "a <title>")
    assert page.startswith("<!doctype html>") and "<title>a &lt;title&gt;</title>" in page
    assert "<h1>Report &lt;b&gt;title&lt;/b&gt;</h1>" in page
    assert "<strong>bold</strong>" in page and "<code>code &lt;x&gt;</code>" in page
    assert '<a href="other/page.html">link</a>' in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<ul><li>first <strong>item</strong></li><li>second <code>item</code></li></ul>" in page
    assert "<table>" in page and "<th>a | b</th>" in page and "<td>0.9</td>" in page
    assert 'style="color:#1a7f37;font-weight:bold">reproduced</td>' in page
    assert "<div class='note'><strong>note:</strong> the budget was hit</div>" in page
    assert '<img src="figs/one.png" alt="first plot"' in page and 'alt="second &lt;plot&gt;"' in page
    assert "<h3>Sub section</h3>" in page
    css = page.split("<style>", 1)[1].split("</style>", 1)[0]
    assert (
        ".figures{display:flex;flex-wrap:wrap" in css and "max-width:100%" in css.split(".figures img", 1)[1]
    )
    text = visible_text(page)
    assert markdown_left(text) == [], markdown_left(text)
    assert "a | b" in text  # a pipe inside a cell is data, not table syntax


def test_inline_edge_cases() -> None:
    assert inline_html("2 * 3 ** 4") == "2 * 3 ** 4"  # unpaired markers stay literal
    assert inline_html("**a `b**` c**") == "<strong>a <code>b**</code> c</strong>"
    assert inline_html("``a`b``") == "<code>a`b</code>"
    assert "<a" not in inline_html("[x](javascript:alert(1))")  # only relative, http(s), mailto, file links
    assert inline_html("[x](https://a.b/c?d=1&e=2)") == '<a href="https://a.b/c?d=1&amp;e=2">x</a>'
    for raw in ("run **1**", "a`b", "[a](b)", "back\\slash `x`", "tail\\", "*", "a\\*b"):
        assert visible_text(inline_html(esc(raw))) == raw, raw  # escaped data reads back literally
    assert esc("path/with_under_scores (1).json") == "path/with_under_scores (1).json"  # readable markdown
    assert inline_html(code("a `tick`")) == "<code>a `tick`</code>"
    assert inline_html(code("format:Q: {prompt}\nA:")) == "<code>format:Q: {prompt} A:</code>"


def test_bin_labels_are_token_ranges() -> None:
    assert bin_ranges(4, 256) == [(0, 63), (64, 127), (128, 191), (192, 255)]
    assert bin_labels(4, 256) == ["0-63", "64-127", "128-191", "192-255"]
    assert bin_labels(3, 10) == ["0-3", "4-6", "7-9"]  # ceil(i * L / B), as opd.diagnostics assigns
    assert bin_labels(2, None) == ["bin 0", "bin 1"]


# ----------------------------------------------------------------------------------------------------
# The writers, on small synthetic inputs


def doctor_result(second: str = "b") -> dict[str, Any]:
    """A `run_doctor` result with two teachers, two templates, four position bins and a flag."""

    def metrics(shift: float) -> dict[str, float]:
        m = {"overlap_ratio": 0.7 + shift, "overlap_mass_student": 0.95, "overlap_mass_teacher": 0.97,
             "overlap_token_advantage": -0.05, "entropy_student": 0.8, "entropy_teacher": 0.6, "entropy_gap": 0.2,
             "reverse_kl": 0.3, "student_acc": 0.4, "teacher_acc": 0.7, "accuracy_gap": 0.3,
             "teacher_only_share": 0.3, "reward_auroc": float("nan"), "continuation_advantage@0.25": 0.2,
             "continuation_advantage@0.5": 0.1}  # fmt: skip
        for b in range(4):
            for key in ("overlap_ratio", "entropy_student", "entropy_teacher", "overlap_mass_teacher"):
                m[f"{key}/bin{b}"] = 0.5 + 0.1 * b + shift
        return m

    templates = ["raw", "format:Q: {prompt}\nA:"]
    verdict = {"code": "go", "headline": "compatible, brings new capability: go",
               "reasons": ["overlap mass 0.97 >= 0.9", "add an `answer` field to measure novelty"],
               "recipe": "run `opd train` with this teacher"}  # fmt: skip
    return {
        "config": {
            "student": "models/student",
            "teachers": ["t/a", "t/b"],
            "samples": 4,
            "temperature": 1.0,
            "max_new_tokens": 256,
            "thresholds": {
                "identical_kl": 1e-4,
                "min_overlap_mass": 0.9,
                "min_overlap_advantage": -0.25,
                "min_accuracy_gap": 0.1,
                "min_novel_share": 0.1,
                "max_truncation": 0.2,
                "indistinguishable_overlap": 0.9,
                "indistinguishable_kl": 0.05,
            },
        },  # fmt: skip
        "n_prompts": 8,
        "k": 16,
        "seconds": 12.0,
        "recommended_template": "raw",
        "templates": {t: {"student_acc": 0.4} for t in templates},
        "teachers": {
            name: {"path": f"t/{name}", "verdict": verdict, "by_template": {t: metrics(s) for t in templates}}
            for name, s in (("a", 0.0), (second, 0.05))
        },
        "pairs": {"raw": {f"a|{second}": {"overlap_ratio": 0.8, "reverse_kl": 0.1, "forward_kl": 0.12}}},
        "flags": ["template raw: 30% of the rollouts hit the 256-token budget"],
    }


def write_runs(tmp_path: Path, message: str = "overlap dropped") -> list[Path]:
    """Two tiny run directories: one with position bins, evals and an event, one flat."""
    good, flat = tmp_path / "good", tmp_path / "flat"
    rows = [{"step": 0, "kind": "eval", "eval/avg@4": 0.5}]
    for s in range(1, 11):
        rows.append({"step": s, "loss": 1.0 - 0.05 * s, "grad_norm": 2.0, "overlap_ratio": 0.7 + 0.02 * s,
                     "entropy_gap": 0.2 - 0.01 * s, "overlap_token_advantage": -0.2 + 0.01 * s,
                     "entropy_student": 0.5, "entropy_student/bin0": 0.5, "entropy_student/bin1": 0.6,
                     "entropy_teacher/bin0": 0.3, "entropy_teacher/bin1": 0.4})  # fmt: skip
    rows.insert(3, {"step": 2, "kind": "alarm", "message": message})
    rows.append({"step": 10, "kind": "eval", "eval/avg@4": 0.7})
    flat_rows = [{"step": s, "loss": 0.01, "grad_norm": 0.1, "overlap_ratio": 0.75, "entropy_gap": 0.02,
                  "overlap_token_advantage": -0.01, "entropy_student": 0.2} for s in range(1, 11)]  # fmt: skip
    for path, rs in ((good, rows), (flat, flat_rows)):
        path.mkdir(parents=True)
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        cfg = {"rollout": {"max_new_tokens": 128}, "diagnostics": {"position_bins": 2}}
        (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return [good, flat]


def write_reports(tmp_path: Path) -> dict[str, Path]:
    """report.html of each writer: doctor, analyze and the lab."""
    doctor = write_doctor_report(doctor_result(), tmp_path / "doctor")
    analysis = write_analysis([load_run(p) for p in write_runs(tmp_path / "runs")], tmp_path / "analysis")
    write_thinking_patterns(
        tmp_path / "lab", compatible_after=0.7
    )  # one experiment with figures, others not run
    lab = build_report(tmp_path / "lab", tmp_path / "lab" / "report.md", plots=True)
    return {"doctor": doctor["html"], "analyze": analysis["html"], "lab": lab["html"]}


def test_writers_leave_no_markdown_in_html(tmp_path: Path) -> None:
    pages = write_reports(tmp_path)
    for name, path in pages.items():
        page = path.read_text()
        assert markdown_left(visible_text(page)) == [], (name, markdown_left(visible_text(page)))
        assert ".figures{display:flex;flex-wrap:wrap" in page, name
        assert "img{display:block;max-width:100%;height:auto}" in page, name

    doctor_md = (tmp_path / "doctor" / "report.md").read_text()
    doctor_page = pages["doctor"].read_text()
    assert "**a** (`t/a`): **compatible, brings new capability: go**" in doctor_md
    assert "> note: template raw: 30% of the rollouts hit the 256-token budget" in doctor_md
    assert "<strong>a</strong> (<code>t/a</code>)" in doctor_page
    assert "<div class='note'><strong>note:</strong> template raw: 30%" in doctor_page
    assert "<code>answer</code>" in doctor_page and "<code>opd train</code>" in doctor_page
    # by-position columns are token ranges, as opd.diagnostics bins tokens (256 tokens, 4 bins)
    assert "| metric | tokens 0-63 | tokens 64-127 | tokens 128-191 | tokens 192-255 |" in doctor_md
    assert (
        '<div class=\'figures\'><figure><a href="by_position.png"><img src="by_position.png"' in doctor_page
    )
    assert (tmp_path / "doctor" / "by_position.png").stat().st_size > 1000
    assert 'src="continuation.png"' in doctor_page

    analysis_md = (tmp_path / "analysis" / "analysis.md").read_text()
    analysis_page = pages["analyze"].read_text()
    assert "## Success signals" in analysis_md and "- **good** (" in analysis_md
    assert "good: step 2: alarm (message=overlap dropped)" in analysis_md
    assert (
        'src="heatmaps/good_entropy_student.png"' in analysis_page
        and 'src="key_metrics.png"' in analysis_page
    )

    lab_page = pages["lab"].read_text()
    # the all-panels image is linked, not shown a second time beside its panels
    assert '<a href="thinking_patterns/figures/thinking_patterns.png">' in lab_page
    assert 'src="thinking_patterns/figures/thinking_patterns.png"' not in lab_page
    # only the claims that ran are rows; the others are one sentence naming the commands to run them
    assert "<code>opd lab run NAME</code>" in lab_page and ">not run</td>" not in lab_page


def test_doctor_report_keeps_names_literal(tmp_path: Path) -> None:
    page = write_doctor_report(doctor_result("b**x**"), tmp_path, plots=False)["html"].read_text()
    assert "<strong>b**x**</strong>" in page and "<td>a vs b**x**</td>" in page


def test_analysis_keeps_event_text_literal(tmp_path: Path) -> None:
    runs = [load_run(p) for p in write_runs(tmp_path / "runs", "overlap `dropped` **fast**")]
    files = write_analysis(runs, tmp_path / "out")
    assert "overlap \\`dropped\\` \\*\\*fast\\*\\*" in files["markdown"].read_text()
    assert "overlap `dropped` **fast**" in visible_text(files["html"].read_text())


def test_doctor_by_position_axis_is_labelled_in_tokens(tmp_path: Path, monkeypatch) -> None:
    """The plot's x ticks are the bins' token ranges, not matplotlib's 0.0, 0.5, 1.0."""
    import matplotlib.figure

    labels: list[list[str]] = []
    real = matplotlib.figure.Figure.savefig

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.canvas.draw()
        for ax in self.axes:
            if ax.get_xlabel() == "response tokens":
                labels.append([t.get_text() for t in ax.get_xticklabels()])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    write_doctor_report(doctor_result(), tmp_path)
    assert labels and all(x == ["0-63", "64-127", "128-191", "192-255"] for x in labels), labels


# ----------------------------------------------------------------------------------------------------
# In a browser

_CHECK = """<script>
window.addEventListener("load", () => {
  const vw = window.innerWidth, out = document.createElement("pre");
  // a table may be wider than a narrow window inside its own horizontal scroll box (class "table"),
  // which must itself fit: numbers are not broken mid-digit to squeeze a table
  const wide = [...document.body.querySelectorAll("*")]
    .filter(e => !(e.parentElement && e.parentElement.closest(".table")))
    .filter(e => e.getBoundingClientRect().right > vw + 1)
    .map(e => e.tagName + "." + e.className);
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  out.id = "opd-check";
  out.textContent = JSON.stringify({vw, scroll: document.documentElement.scrollWidth, wide, broken,
                                    text: document.body.innerText});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_check(path: Path, width: int) -> dict[str, Any]:
    """Lay `path` out in headless Chromium at `width` px; what overflows, what failed to load, the text."""
    chromium = _chromium()
    assert chromium is not None
    probe = path.with_name("_browser_check.html")  # beside the report, so figure paths resolve
    probe.write_text(path.read_text().replace("</body>", _CHECK + "</body>"))
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--window-size={width},900", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    m = re.search(r'<pre id="opd-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"{path}: no check output from chromium (rc {proc.returncode}): {proc.stderr[-2000:]}"
    res = json.loads(html.unescape(m.group(1)))
    assert res["vw"] == width
    return res


needs_chromium = pytest.mark.skipif(
    _chromium() is None, reason="no chromium/chromium-browser on PATH (apt-get install chromium)"
)


@pytest.mark.real
@needs_chromium
def test_browser_check_catches_the_old_bugs(tmp_path: Path) -> None:
    """The check itself: a page with raw markdown and a too-wide figure (the old doctor page) fails it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 3.2))
    fig.savefig(tmp_path / "wide.png", dpi=110)
    plt.close(fig)
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!doctype html><html><body><p>**a**</p><p>&gt; note: x</p><p><img src='wide.png'></p></body></html>"
    )
    res = _browser_check(bad, 1200)
    assert res["scroll"] > res["vw"] and any(w.startswith("IMG") for w in res["wide"])
    assert "**" in markdown_left(res["text"]) and any(
        f.startswith("blockquote") for f in markdown_left(res["text"])
    )


@pytest.mark.real
@needs_chromium
@pytest.mark.parametrize("width", [1200, 700])
def test_reports_in_chromium(tmp_path: Path, width: int) -> None:
    for name, path in write_reports(tmp_path).items():
        res = _browser_check(path, width)
        assert res["scroll"] <= res["vw"], (name, width, res["scroll"], res["wide"])
        assert res["wide"] == [], (name, width, res["wide"])
        assert res["broken"] == [], (name, res["broken"])
        assert markdown_left(res["text"]) == [], (name, markdown_left(res["text"]))
