"""opd's plug-ins (the lab's commands, `lab:NAME` models, their defaults) are entry points; installed, the
distribution's metadata declares them, and from a plain source tree (`PYTHONPATH=src`, no metadata, as on
the GPU machine) `opd.runtime.entry_points` falls back to the same table, declared once in the package."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from opd import runtime
from opd.errors import ModelError
from opd.models.loading import model_defaults, model_scheme

REPO = Path(__file__).resolve().parents[1]
LAB_DEFAULTS = {"verifier": "opd.lab.world:LabVerifier", "template": "raw"}


def test_the_fallback_table_is_pyprojects_entry_points():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared == runtime.OPD_ENTRY_POINTS


@pytest.fixture
def no_metadata(monkeypatch):
    """importlib.metadata finds no entry point at all: opd imported from a source tree."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])


def test_lookups_work_without_any_installed_entry_point(no_metadata):
    from opd.lab.zoo import zoo_path

    assert model_scheme("lab") is zoo_path
    assert model_defaults("lab:student") == LAB_DEFAULTS
    with pytest.raises(ModelError, match=r"no resolver for nope:.*known: lab:NAME"):
        model_scheme("nope")
    from opd.cli import _add_commands

    app = typer.Typer()
    _add_commands(app)
    assert "lab" in {g.name for g in app.registered_groups}  # the lab's commands, registered by the table
    assert "demo" in {c.name for c in app.registered_commands}


def test_installed_entry_points_come_first_and_are_not_doubled(monkeypatch):
    # the installed opd declares the group: exactly its entries, no second `lab`
    assert [ep.name for ep in runtime.entry_points("opd.model_schemes")].count("lab") == 1
    # another package (no opd installed) claims `lab`: its entry point is kept, opd's fills nothing in
    other = importlib.metadata.EntryPoint("lab", "json:loads", "opd.model_schemes")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [other])
    assert [ep.value for ep in runtime.entry_points("opd.model_schemes")] == ["json:loads"]
    assert runtime.entry_points("some.other.group") == [other]  # a group opd does not declare


def _plain_checkout():
    spec = importlib.util.spec_from_file_location("plain_checkout", REPO / "scripts" / "plain_checkout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plain_checkout_without_an_installed_opd(tmp_path):
    """The GPU machine's situation for real: a copy of what the device tool carries, the dependencies on
    PYTHONPATH, no opd distribution anywhere; the lab's models and commands resolve there."""
    pc = _plain_checkout()
    assert pc.is_opd_entry("opd-0.1.0.dist-info") and pc.is_opd_entry("__editable__.opd-0.1.0.pth")
    assert pc.is_opd_entry("__editable___opd_0_1_0_finder.py") and pc.is_opd_entry("opd")
    assert not pc.is_opd_entry("opdx") and not pc.is_opd_entry("torch")
    info = pc.build(tmp_path / "plain")
    assert (
        info["distribution"] is None
        and not (tmp_path / "plain" / "checkout" / "src" / "opd.egg-info").exists()
    )
    code = (
        "from opd.models.loading import model_scheme, model_defaults\n"
        "from opd.cli import app\n"
        "print(model_scheme('lab')('student').name, model_defaults('lab:student')['template'],\n"
        "      'lab' in {g.name for g in app.registered_groups})\n"
    )
    proc = subprocess.run(
        [str(pc.venv_python(tmp_path / "plain" / "venv")), "-c", code],
        env=pc.environment(tmp_path / "plain"),
        cwd=tmp_path / "plain" / "checkout",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["student", "raw", "True"]


def test_plain_checkout_refuses_a_visible_distribution(tmp_path, monkeypatch):
    pc = _plain_checkout()
    monkeypatch.setattr(pc, "is_opd_entry", lambda name: name.endswith(".pth"))  # opd's dist-info kept
    if not any(p.name.startswith("opd-") for d in pc.site_dirs() for p in d.iterdir()):
        pytest.skip("opd is not installed in this interpreter")
    with pytest.raises(SystemExit, match="distribution is still visible|not from"):
        pc.build(tmp_path / "plain")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
