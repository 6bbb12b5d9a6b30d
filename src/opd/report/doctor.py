"""Writing `opd doctor`'s result: doctor.json (machine-readable), report.md / report.html and plots.

Kept apart from `opd.evaluation.doctor` so the measuring code has no file or plotting concerns; everything here is
derived from the result dict `run_doctor` returns, so a report can be re-rendered from doctor.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from opd.report.bins import bin_labels
from opd.report.render import (
    Block,
    Bullets,
    Figure,
    Figures,
    Heading,
    Note,
    Paragraph,
    Table,
    code,
    esc,
    to_markdown,
    write_document,
)

__all__ = [
    "METRIC_ROWS",
    "POSITION_METRICS",
    "build_document",
    "readability_note",
    "render_markdown",
    "write_doctor_report",
]

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
# The metrics shown by response position: the table's rows per teacher, and the figure's panels row by row.
POSITION_METRICS: tuple[str, ...] = (
    "overlap_ratio",
    "entropy_student",
    "entropy_teacher",
    "overlap_mass_teacher",
)
_PLOTTED_POSITION_METRICS = ("overlap_ratio", "overlap_mass_teacher", "entropy_student", "entropy_teacher")


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


def readability_note(res: dict[str, Any]) -> str | None:
    """In plain words, why a verdict was withheld (most answers unreadable by the verifier), or None."""
    a = res.get("answers") or {}
    if not a.get("withheld"):
        return None
    parts = []
    if a["references"]["total"] and a["references"]["unparsed"] * 2 >= a["references"]["total"]:
        parts.append(f"{a['references']['unparsed']} of {a['references']['total']} reference answers")
    parts.append(f"{a['student']['unparsed']} of {a['student']['total']} student answers")
    parts += [
        f"{a['teachers'][n]['unparsed']} of {a['teachers'][n]['total']} answers of {n}" for n in a["withheld"]
    ]
    who = ", ".join(a["withheld"])
    return (
        f"no verdict on new capability for {who}: the {a['verifier']} verifier could not read most answers "
        f"({'; '.join(parts)} unreadable, template {a['template']}), so the accuracies are about 0 whatever the "
        f"models can do. Rerun with --verifier {a['use_verifier']}."
    )


def build_document(res: dict[str, Any], figures: dict[str, str] | None = None) -> list[Block]:
    """The report: verdicts first, then the numbers behind them, templates, pairs, thresholds."""
    cfg = res["config"]
    best = res["recommended_template"]
    doc: list[Block] = [
        Heading("opd doctor", 1),
        Paragraph(
            f"student {code(cfg['student'])}; {len(cfg['teachers'])} teacher(s); {res['n_prompts']} prompts x "
            f"{cfg['samples']} student rollouts (T={cfg['temperature']:g}, {cfg['max_new_tokens']} new tokens); "
            f"top-k = {res['k']}; {res['seconds']:.0f} s."
        ),
        Heading("Verdicts"),
    ]
    unreadable = readability_note(res)
    if unreadable:
        doc.append(Note(esc(unreadable), label="verdict withheld"))
    # doctor.json files written before the sample-size check have no "sample"
    for name, caution in res.get("sample", {}).get("noisy", {}).items():
        doc.append(Note(esc(f"{name}: {caution}"), label="caution"))
    for name, t in res["teachers"].items():
        v = t["verdict"]
        doc.append(Paragraph(f"**{esc(name)}** ({code(t['path'])}): **{v['headline']}**"))
        doc.append(Bullets([*v["reasons"], f"recipe: {v['recipe']}"]))
    doc += [Note(esc(f)) for f in res.get("flags", [])]
    doc.append(Heading(f"Numbers at the student's states (template {code(best)})"))
    names, rows = _teacher_rows(res, best)
    doc.append(Table(["metric", *map(esc, names)], rows, numeric=True))
    if len(res["templates"]) > 1:
        doc += [
            Heading("Templates"),
            Paragraph(f"Recommended: {code(best)} (highest mean overlap ratio over the teachers)."),
        ]
        header = [
            "template",
            "student acc",
            *[f"{esc(n)}: overlap ratio" for n in names],
            *[f"{esc(n)}: entropy gap" for n in names],
        ]
        trs = []
        for tmpl, info in res["templates"].items():
            trs.append([code(tmpl), _fmt(info.get("student_acc"), True)]
                       + [_fmt(res["teachers"][n]["by_template"][tmpl].get("overlap_ratio")) for n in names]
                       + [_fmt(res["teachers"][n]["by_template"][tmpl].get("entropy_gap")) for n in names])  # fmt: skip
        doc.append(Table(header, trs, numeric=True))
    pairs = res.get("pairs", {}).get(best, {})
    if pairs:
        prs = [[esc(k.replace("|", " vs ")), _fmt(d.get("overlap_ratio")), _fmt(d.get("reverse_kl")),
                _fmt(d.get("forward_kl"))] for k, d in pairs.items()]  # fmt: skip
        doc += [
            Heading("Teacher vs teacher at the student's states"),
            Table(["pair", "overlap ratio", "KL(a‖b)", "KL(b‖a)"], prs, numeric=True),
        ]
    bins = _bins(res, best)
    if bins:
        labels = bin_labels(max(bins) + 1, cfg.get("max_new_tokens"))
        header = [
            "metric",
            *[labels[b] if labels[b].startswith("bin") else f"tokens {labels[b]}" for b in bins],
        ]
        prow = []
        for n in names:
            m = res["teachers"][n]["by_template"][best]
            for key in POSITION_METRICS:
                prow.append([f"{esc(n)}: {key}"] + [_fmt(m.get(f"{key}/bin{b}")) for b in bins])
        doc += [Heading("By response position"), Table(header, prow, numeric=True)]
    if figures:
        doc.append(Figures([Figure(rel, title) for title, rel in figures.items()]))
    th = cfg["thresholds"]
    doc += [
        Heading("How the verdict is decided"),
        Paragraph(
            "Ordered rules on the numbers above (`opd.evaluation.doctor.verdict`): identical if reverse KL <= "
            f"{th['identical_kl']:g}; incompatible thinking pattern if the teacher's overlap mass < "
            f"{th['min_overlap_mass']:g} or the overlap-token advantage < {th['min_overlap_advantage']:g}; "
            "no verdict on new capability when the verifier cannot read half or more of the reference answers, "
            "the student's answers or the teacher's (every accuracy would be about 0); "
            f"no new capability if teacher - student accuracy < {th['min_accuracy_gap']:g} and the share of "
            f"problems only the teacher solves < {th['min_novel_share']:g}; otherwise go. Two teachers are "
            f"flagged indistinguishable at overlap ratio >= {th['indistinguishable_overlap']:g} and KL <= "
            f"{th['indistinguishable_kl']:g}."
            + (
                f" A verdict is marked noisy (and still given) when it rests on fewer than {th['min_prompts']} "
                "prompts, or when it is decided on the accuracy gap and the gap's standard error exceeds "
                f"{th['min_accuracy_gap']:g}."
                if "min_prompts" in th  # doctor.json of older versions has no sample-size rule
                else ""
            )
        ),
        Paragraph(
            "The thresholds were set on the opd lab (`opd lab run thinking_patterns novelty_vs_scale`), where "
            "what OPD does with each teacher is measured: the pattern-B teacher (OPD fails) has teacher overlap "
            "mass about 0.46 and overlap-token advantage about -0.43 at k=4, the compatible teachers 0.98-1.0 and "
            "about -0.07; the paper reports 0.97-0.99 overlap mass for working pairs at k=16. The accuracy "
            "thresholds are round numbers, not fitted. Change them with `--thresholds.NAME VALUE`."
        ),
    ]
    return doc


def render_markdown(res: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    """report.md's text, for callers that want the markdown without writing files."""
    return to_markdown(build_document(res, figures))


def _bins(res: dict[str, Any], template: str) -> list[int]:
    """The position bins any teacher logged for `template`, in order."""
    return sorted({int(k.split("/bin")[1]) for t in res["teachers"].values() for k in t["by_template"][template]
                   if "/bin" in k})  # fmt: skip


def _plots(res: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = res["recommended_template"]
    names = list(res["teachers"])
    figs: dict[str, str] = {}
    bins = _bins(res, best)
    if bins:
        labels = bin_labels(max(bins) + 1, res["config"].get("max_new_tokens"))
        # 2 x 2, not one row: four panels in a row are too small to read once a page scales them down.
        fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), squeeze=False)
        for ax, key in zip(axes.flat, _PLOTTED_POSITION_METRICS, strict=True):
            for n in names:
                m = res["teachers"][n]["by_template"][best]
                b = [i for i in bins if isinstance(m.get(f"{key}/bin{i}"), (int, float))]
                ax.plot(b, [m[f"{key}/bin{i}"] for i in b], marker="o", label=n)
            ax.set_title(key.replace("_", " "))
            ax.set_xticks(bins)
            ax.set_xticklabels([labels[i] for i in bins], rotation=30 if len(bins) > 4 else 0, fontsize=8)
            ax.set_xlabel("response tokens")
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "by_position.png", dpi=100)
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
    paths = {"json": out / "doctor.json", "markdown": out / "report.md", "html": out / "report.html"}
    atomic_write_text(paths["json"], json.dumps(json_safe(res), indent=2, allow_nan=False) + "\n")
    write_document(build_document(res, figs), paths["markdown"], paths["html"], title="opd doctor")
    for rel in figs.values():
        paths[rel] = out / rel
    return paths
