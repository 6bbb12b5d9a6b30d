"""The package's shape, checked: folders are layers and imports only point down.

Read from the source (every ``import opd...``, lazy ones inside functions included), so a new import
that points up, a cycle between folders, or a library module that reaches into the CLI or the lab fails
here with the offending file and line, not in a code review months later.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "opd"

# Lowest first. A module may import its own folder and any folder of a lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "files", "runtime"),  # what every layer needs: failures, atomic writes, library switches
    ("objectives", "diagnostics"),  # pure tensor maths
    ("device", "precision", "progress", "data", "config"),  # runtime and settings shared by all commands
    ("models", "generation", "teachers"),  # backends: load, sample, score
    ("evaluation", "analysis", "report"),  # measuring and writing results
    ("train",),  # the OPD and SFT loops
    ("recipes",),  # the paper's recipes over the loops
    ("cli",),  # one thin module per command
    ("lab",),  # the self-contained lab world, zoo and experiments
]
RANK = {group: i for i, layer in enumerate(LAYERS) for group in layer}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "opd"


def _imports() -> list[tuple[str, int, str]]:
    """(file, line, imported opd module) for every import of opd in the package."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("opd"):
                out.append((str(path.relative_to(SRC.parent)), node.lineno, node.module))
            elif isinstance(node, ast.Import):
                out += [
                    (str(path.relative_to(SRC.parent)), node.lineno, a.name)
                    for a in node.names
                    if a.name.startswith("opd")
                ]
    return out


def test_every_folder_and_top_level_module_has_a_layer():
    groups = {_group(_module(p)) for p in SRC.rglob("*.py")} - {"opd"}
    assert groups <= set(RANK), f"give {sorted(groups - set(RANK))} a layer in LAYERS"


def test_imports_point_down_the_layers():
    wrong = []
    for file, line, target in _imports():
        src, dst = _group(_module(SRC.parent / file)), _group(target)
        if dst == "opd" or src == dst:
            continue
        if src == "opd":  # the package's __init__ runs first for every import: layer 0 only
            if RANK[dst] != 0:
                wrong.append(f"{file}:{line} (the package root) imports {target} (layer {RANK[dst]})")
            continue
        if RANK[dst] > RANK[src]:
            wrong.append(f"{file}:{line} ({src}, layer {RANK[src]}) imports {target} (layer {RANK[dst]})")
    assert not wrong, "imports that point up:\n" + "\n".join(wrong)


def test_nothing_imports_the_cli_and_only_the_lab_imports_the_lab():
    wrong = []
    for file, line, target in _imports():
        src, dst = _group(_module(SRC.parent / file)), _group(target)
        if dst in ("cli", "lab") and src != dst:
            wrong.append(f"{file}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_folder_graph_has_no_cycle():
    edges: dict[str, set[str]] = defaultdict(set)
    for file, _, target in _imports():
        src, dst = _group(_module(SRC.parent / file)), _group(target)
        if src != dst and dst != "opd":
            edges[src].add(dst)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            pytest.fail("import cycle between folders: " + " -> ".join([*path, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(edges[node]):
            visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        visit(node, [])


def test_the_public_names_still_import_from_their_documented_places():
    from opd.diagnostics import token_diagnostics
    from opd.objectives import per_token_loss, signal_stats, token_loss

    assert all(callable(f) for f in (token_loss, per_token_loss, signal_stats, token_diagnostics))


# Names of teacher/generator kinds and backends: a branch on one of them under train/ is what
# `opd.teachers.contract` exists to prevent (a new backend would have to edit the training loop).
_BACKEND_NAMES = {"hf", "vllm", "http"}
_KIND_CLASSES = {"TeacherTopK", "TeacherHidden", "HFTeacher", "HTTPTeacher", "VLLMTeacher", "TopKTeacher",
                 "HFGenerator", "VLLMGenerator"}  # fmt: skip


def _kind_branches(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts
                       if isinstance(e, ast.Constant)]  # fmt: skip
            names = {c.value for c in consts if isinstance(c.value, str)} & _BACKEND_NAMES
            if names:
                found.append((node.lineno, f"compares with backend name {sorted(names)[0]!r}"))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "isinstance"
            and len(node.args) == 2
        ):
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            names = {
                k.id if isinstance(k, ast.Name) else getattr(k, "attr", "") for k in kinds
            } & _KIND_CLASSES
            if names:
                found.append((node.lineno, f"isinstance(..., {sorted(names)[0]})"))
    return found


def test_the_training_loop_never_asks_which_teacher_or_generator_it_holds():
    wrong = [
        f"{path.relative_to(SRC.parent)}:{line}: {what}"
        for path in sorted((SRC / "train").rglob("*.py"))
        for line, what in _kind_branches(ast.parse(path.read_text(), str(path)))
    ]
    assert not wrong, (
        "teacher/generator kinds are chosen in opd.teachers.build / opd.generation.build and hidden behind "
        "opd.teachers.contract; move these branches there:\n" + "\n".join(wrong)
    )


def test_the_kind_branch_check_can_fail():
    code = 'if cfg.teacher.backend == "hf":\n    pass\nif isinstance(t, TeacherTopK):\n    pass\nx = a in ("vllm", "b")\n'
    assert [w for _, w in _kind_branches(ast.parse(code))] == [
        "compares with backend name 'hf'", "isinstance(..., TeacherTopK)", "compares with backend name 'vllm'"
    ]  # fmt: skip
