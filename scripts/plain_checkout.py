#!/usr/bin/env python3
"""opd as the GPU machine sees it: a plain checkout on PYTHONPATH, its dependencies importable, opd not installed.

    scripts/plain_checkout.py DEST                                   # build DEST, check it, print how to use it
    scripts/plain_checkout.py DEST -- scripts/gpu_check.py --cpu /abs/out   # and run `python ARGS` in it

The GPU machine cannot install anything: the checkout travels without its ignored files (no
`src/opd.egg-info`, so no entry points, no distribution metadata), and every package it lacks comes as a
wheel unpacked with `pip install --target` into a folder on PYTHONPATH. A developer machine hides all of
that: opd is installed in its venv, and `PYTHONPATH=src` there still finds `src/opd.egg-info`. This builds
the GPU machine's situation from this interpreter's packages:

  DEST/checkout  the files the device tool carries: tracked ones and untracked ones git does not ignore
  DEST/deps      a symlink per entry of this interpreter's site-packages, opd's own distribution (dist-info,
                 egg-info, editable hooks, an installed `opd` package) and .pth files left out; the folder is
                 not called site-packages, so packages found there are not taken for installed ones (dill,
                 for one, pickles such modules by value), as with the GPU machine's .gpu_carry/site
  DEST/venv      a venv without pip or site packages: its python sees only PYTHONPATH=DEST/deps:DEST/checkout/src

It then checks that opd imports from DEST/checkout/src and that no `opd` distribution is visible, and
with `-- ARGS` runs `DEST/venv/bin/python ARGS` in DEST/checkout with that PYTHONPATH (give output paths
absolute: the command runs in the copy). CI runs the GPU check this way (.ci/run). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = "opd"

CHECK = r"""
import importlib.metadata as md, json, sys
import opd
try:
    dist = str(md.distribution("opd")._path)
except md.PackageNotFoundError:
    dist = None
print(json.dumps({"opd": opd.__file__, "distribution": dist, "python": sys.executable}))
"""


def carried_files(repo: Path) -> list[str]:
    """What the device tool carries: tracked files and untracked ones git does not ignore (that exist)."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    names = sorted({n for n in out.decode().split("\0") if n})
    return [n for n in names if (repo / n).is_file() or (repo / n).is_symlink()]


def copy_checkout(repo: Path, dest: Path) -> int:
    """Copy the carried files of `repo` into `dest` (recreated); the number of files."""
    if dest.exists():
        shutil.rmtree(dest)
    n = 0
    inside = _relative(dest, repo)
    for name in carried_files(repo):
        if inside is not None and (name == inside or name.startswith(inside + "/")):
            continue  # DEST inside the checkout (and not ignored): not a copy of itself
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target, follow_symlinks=False)
        n += 1
    return n


def _relative(path: Path, base: Path) -> str | None:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return None


def is_opd_entry(name: str) -> bool:
    """Whether a site-packages entry belongs to an installed opd (or is a .pth hook, which PYTHONPATH would
    not run anyway)."""
    low = name.lower()
    return (
        low == DISTRIBUTION
        or low.startswith((f"{DISTRIBUTION}-", f"{DISTRIBUTION}.egg", f"__editable__.{DISTRIBUTION}-"))
        or low.startswith(f"__editable___{DISTRIBUTION}_")
        or low.endswith(".pth")
        or low == "__pycache__"
    )


def site_dirs() -> list[Path]:
    """This interpreter's site-packages folders (purelib and platlib, once each)."""
    paths = sysconfig.get_paths()
    out: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p not in out:
            out.append(p)
    return out


def link_deps(dest: Path, sources: Sequence[Path]) -> int:
    """Symlink every entry of `sources` into `dest` (recreated) but opd's own; the number of links."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    n = 0
    for src in sources:
        for entry in sorted(src.iterdir()):
            if is_opd_entry(entry.name) or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
            n += 1
    return n


def venv_python(dest: Path) -> Path:
    return dest / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def build(dest: Path) -> dict[str, object]:
    """DEST/checkout, DEST/deps and DEST/venv as the module docstring describes; then the import check."""
    dest.mkdir(parents=True, exist_ok=True)
    files = copy_checkout(REPO, dest / "checkout")
    links = link_deps(dest / "deps", site_dirs())
    if not venv_python(dest / "venv").exists():
        venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=os.name != "nt").create(
            dest / "venv"
        )
    info = check(dest)
    return {"files": files, "links": links, **info}


def environment(dest: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(dest / "deps"), str(dest / "checkout" / "src")])
    env["PYTHONNOUSERSITE"] = "1"
    return env


def check(dest: Path) -> dict[str, object]:
    """Where opd imports from and whether any opd distribution is visible to DEST's python; raises
    SystemExit with what is wrong when it is not a plain checkout."""
    import json

    proc = subprocess.run(
        [str(venv_python(dest / "venv")), "-c", CHECK],
        capture_output=True,
        text=True,
        env=environment(dest),
        cwd=dest / "checkout",
    )
    if proc.returncode != 0:
        raise SystemExit(f"error: opd does not import in {dest}:\n{proc.stderr.strip()[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    src = (dest / "checkout" / "src").resolve()
    if not Path(info["opd"]).resolve().is_relative_to(src):
        raise SystemExit(f"error: opd imports from {info['opd']}, not from {src}")
    if info["distribution"] is not None:
        raise SystemExit(f"error: an installed opd distribution is still visible: {info['distribution']}")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="plain_checkout.py", description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path, help="folder to build (its checkout/, deps/ and venv/ are replaced)")
    args = p.parse_args(argv)
    dest = args.dest.resolve()
    info = build(dest)
    print(
        f"plain checkout in {dest}: {info['files']} files, {info['links']} dependency links; opd from "
        f"{info['opd']}, no opd distribution installed",
        file=sys.stderr,
        flush=True,
    )
    if not command:
        print(
            f"cd {dest / 'checkout'} && PYTHONPATH={environment(dest)['PYTHONPATH']} {venv_python(dest / 'venv')}"
        )
        return 0
    return subprocess.run(
        [str(venv_python(dest / "venv")), *command], env=environment(dest), cwd=dest / "checkout"
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
