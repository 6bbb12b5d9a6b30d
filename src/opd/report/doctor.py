"""Writing `opd doctor`'s result: doctor.json (machine-readable), report.md / report.html and plots.

Kept apart from `opd.evaluation.doctor` so the measuring code has no file or plotting concerns; everything here is
derived from the result dict `run_doctor` returns, so a report can be re-rendered from doctor.json.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["METRIC_ROWS", "render_markdown", "write_doctor_report"]

# (key, label, is_percentage) in the order the report shows them.
METRIC_ROWS: tuple[tuple[str, str, bool], ...] = (
    ("overlap_ratio", "overlap ratio (top-k)", False),
    ("overlap_mass_student", "overlap mass, student", False),
    ("overlap_mass_teacher", "overlap mass, teacher", False),
    ("overlap_token_advantage", "overlap-token advantage", False),
    ("entropy_student", "student entropy (nats)", False),
    ("entropy_teacher", "teacher entropy (nats)", False),
    ("entropy_gap", "entropy gap, mean of abs(H(q) - H(p))", False),
    ("reverse_kl", "reverse KL (nats/token)", False),
    ("student_acc", "student accuracy", True),
    ("teacher_acc", "teacher accuracy", True),
    ("accuracy_gap", "teacher - student accuracy", True),
    ("teacher_only_share", "problems only the teacher solves", True),
    ("reward_auroc", "AUROC of sequence-mean reward", False),
)


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, float)):
        return f"{100 * x:.1f}%" if pct else f"{x:.4g}"
    return str(x)


def _teacher_rows(res: dict[str, Any], template: str) -> tuple[list[str], list[list[str]]]:
    names = list(res["teachers"])
    rows = []
    for key, label, pct in METRIC_ROWS:
        rows.append(
            [label] + [_fmt(res["teachers"][n]["by_template"][template].get(key), pct) for n in names]
        )
    depths = sorted(
        {k.split("@", 1)[1] for n in names for k in res["teachers"][n]["by_template"][template]
         if k.startswith("continuation_advantage@")},
        key=float,
    )  # fmt: skip
    for d in depths:
        rows.append(
            [f"continuation advantage @ {float(d):.0%} of the rollout"]
            + [_fmt(res["teachers"][n]["by_template"][template].get(f"continuation_advantage@{d}"), True) for n in names]
        )  # fmt: skip
    return names, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(res: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    """The report as markdown: verdicts first, then the numbers behind them, templates, pairs, thresholds."""
    cfg = res["config"]
    best = res["recommended_template"]
    lines = [
        "# opd doctor",
        "",
        f"student `{cfg['student']}`; {len(cfg['teachers'])} teacher(s); {res['n_prompts']} prompts x "
        f"{cfg['samples']} student rollouts (T={cfg['temperature']:g}, {cfg['max_new_tokens']} new tokens); "
        f"top-k = {res['k']}; {res['seconds']:.0f} s.",
        "",
        "## Verdicts",
        "",
    ]
    for name, t in res["teachers"].items():
        v = t["verdict"]
        lines += [f"**{name}** (`{t['path']}`): **{v['headline']}**", ""]
        lines += [f"- {r}" for r in v["reasons"]]
        lines += [f"- recipe: {v['recipe']}", ""]
    for f in res.get("flags", []):
        lines += [f"> note: {f}", ""]
    lines += [f"## Numbers at the student's states (template `{best}`)", ""]
    names, rows = _teacher_rows(res, best)
    lines += [_md_table(["metric", *names], rows), ""]
    if len(res["templates"]) > 1:
        lines += [
            "## Templates",
            "",
            f"Recommended: `{best}` (highest mean overlap ratio over the teachers).",
            "",
        ]
        header = [
            "template",
            "student acc",
            *[f"{n}: overlap ratio" for n in names],
            *[f"{n}: entropy gap" for n in names],
        ]
        trs = []
        for tmpl, info in res["templates"].items():
            trs.append([f"`{tmpl}`", _fmt(info.get("student_acc"), True)]
                       + [_fmt(res["teachers"][n]["by_template"][tmpl].get("overlap_ratio")) for n in names]
                       + [_fmt(res["teachers"][n]["by_template"][tmpl].get("entropy_gap")) for n in names])  # fmt: skip
        lines += [_md_table(header, trs), ""]
    pairs = res.get("pairs", {}).get(best, {})
    if pairs:
        lines += ["## Teacher vs teacher at the student's states", ""]
        prs = [[k.replace("|", " vs "), _fmt(d.get("overlap_ratio")), _fmt(d.get("reverse_kl")), _fmt(d.get("forward_kl"))]
               for k, d in pairs.items()]  # fmt: skip
        lines += [_md_table(["pair", "overlap ratio", "KL(a‖b)", "KL(b‖a)"], prs), ""]
    bins = sorted({k.split("/bin")[1] for n in names for k in res["teachers"][n]["by_template"][best]
                   if "/bin" in k}, key=int)  # fmt: skip
    if bins:
        lines += ["## By response position", ""]
        budget = cfg["max_new_tokens"]
        nb = len(bins)
        header = ["metric", *[f"tokens {int(b) * budget // nb}-{(int(b) + 1) * budget // nb}" for b in bins]]
        prow = []
        for n in names:
            m = res["teachers"][n]["by_template"][best]
            for key in ("overlap_ratio", "entropy_student", "entropy_teacher", "overlap_mass_teacher"):
                prow.append([f"{n}: {key}"] + [_fmt(m.get(f"{key}/bin{b}")) for b in bins])
        lines += [_md_table(header, prow), ""]
    for title, rel in (figures or {}).items():
        lines += [f"![{title}]({rel})", ""]
    th = cfg["thresholds"]
    lines += [
        "## How the verdict is decided",
        "",
        "Ordered rules on the numbers above (`opd.evaluation.doctor.verdict`): identical if reverse KL <= "
        f"{th['identical_kl']:g}; incompatible thinking pattern if the teacher's overlap mass < "
        f"{th['min_overlap_mass']:g} or the overlap-token advantage < {th['min_overlap_advantage']:g}; "
        f"no new capability if teacher - student accuracy < {th['min_accuracy_gap']:g} and the share of "
        f"problems only the teacher solves < {th['min_novel_share']:g}; otherwise go. Two teachers are "
        f"flagged indistinguishable at overlap ratio >= {th['indistinguishable_overlap']:g} and KL <= "
        f"{th['indistinguishable_kl']:g}.",
        "",
        "The thresholds were set on the opd lab (`opd lab run thinking_patterns novelty_vs_scale`), where "
        "what OPD does with each teacher is measured: the pattern-B teacher (OPD fails) has teacher overlap "
        "mass about 0.46 and overlap-token advantage about -0.43 at k=4, the compatible teachers 0.98-1.0 and "
        "about -0.07; the paper reports 0.97-0.99 overlap mass for working pairs at k=16. The accuracy "
        "thresholds are round numbers, not fitted. Change them with `--thresholds.NAME VALUE`.",
        "",
    ]
    return "\n".join(lines)


def _plots(res: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = res["recommended_template"]
    names = list(res["teachers"])
    figs: dict[str, str] = {}
    metrics = [m for m in res["teachers"][names[0]]["by_template"][best] if m.endswith("/bin0")]
    if metrics:
        keys = ("overlap_ratio", "overlap_mass_teacher", "entropy_student", "entropy_teacher")
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
        for ax, key in zip(axes, keys, strict=True):
            for n in names:
                m = res["teachers"][n]["by_template"][best]
                b = sorted(int(k.split("/bin")[1]) for k in m if k.startswith(f"{key}/bin"))
                ax.plot(b, [m[f"{key}/bin{i}"] for i in b], marker="o", label=n)
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("response-position bin")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "by_position.png", dpi=110)
        plt.close(fig)
        figs["metrics by response position"] = "by_position.png"
    cont = {
        n: sorted(
            (float(k.split("@", 1)[1]), v)
            for k, v in res["teachers"][n]["by_template"][best].items()
            if k.startswith("continuation_advantage@") and isinstance(v, float) and math.isfinite(v)
        )
        for n in names
    }
    if any(cont.values()):
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for n, pts in cont.items():
            if pts:
                ax.plot([100 * d for d, _ in pts], [v for _, v in pts], marker="o", label=n)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("prefix depth (% of the student rollout)")
        ax.set_ylabel("teacher continuation advantage")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "continuation.png", dpi=110)
        plt.close(fig)
        figs["teacher continuation advantage by depth"] = "continuation.png"
    return figs


def write_doctor_report(res: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """doctor.json, report.md, report.html and the PNGs into `out_dir`; returns their paths."""
    from opd.files import atomic_write_text, json_safe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = _plots(res, out) if plots else {}
    md = render_markdown(res, figs)
    paths = {"json": out / "doctor.json", "markdown": out / "report.md", "html": out / "report.html"}
    atomic_write_text(paths["json"], json.dumps(json_safe(res), indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], md + "\n")
    atomic_write_text(paths["html"], _html(md))
    for rel in figs.values():
        paths[rel] = out / rel
    return paths


def _html(md: str) -> str:
    """A self-contained page: tables and images rendered, everything else escaped text."""
    body: list[str] = []
    rows: list[str] = []

    def flush() -> None:
        if rows:
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows if not set(r) <= set("|-")]
            head, *rest = cells
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</table>")  # fmt: skip
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            alt, _, rest = line[2:].partition("](")
            body.append(f'<p><img src="{html.escape(rest.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")  # fmt: skip
    return f"<!doctype html><html><head><meta charset='utf-8'><title>opd doctor</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
