"""What opd decides for the libraries under it, once, before any model is built.

transformers >= 5.25 depends on the `kernels` package and turns *hub kernels* on by default: every
`from_pretrained` model calls `kernelize()` on `model.train()` / `model.eval()`, which may download
kernel code from the Hugging Face hub at run time and swaps layers for kernels whose numerics differ from
the reference PyTorch ones (and, on a CPU-only torch, asks `torch.cuda.get_device_capability()` and
crashes). opd promises no network access at run time unless asked and the same numerics on every
machine, so it turns them off for every command and every library use, unless the user asks:

- ``OPD_HUB_KERNELS=1`` turns them on (transformers' own default: kernels from the hub where a model
  supports them, e.g. fused RMSNorm / attention on a GPU); ``OPD_HUB_KERNELS=0`` forces them off.
- Without it, an explicit ``USE_HUB_KERNELS`` (transformers' own variable) is respected as set.
- With neither set, opd sets ``USE_HUB_KERNELS=NO``. transformers reads it at every load, so setting it
  when `opd` is imported covers the models built afterwards, and child processes (torchrun ranks,
  servers) inherit it.

It also holds the entry points opd itself declares (`OPD_ENTRY_POINTS`): `entry_points(group)` is how
opd looks up its plug-ins (the lab's commands, ``lab:NAME`` models and their defaults), installed or run
from a source tree with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

HUB_KERNELS_ENV = "OPD_HUB_KERNELS"
TRANSFORMERS_ENV = "USE_HUB_KERNELS"
_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


def configure_hub_kernels(environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """Set transformers' hub-kernel switch from opd's rule (module docstring); True when kernels are on.

    An unreadable ``OPD_HUB_KERNELS`` value is an error naming the variable, not a silent default.
    """
    env = os.environ if environ is None else environ
    ours = env.get(HUB_KERNELS_ENV, "").strip().lower()
    if ours in _TRUE:
        env[TRANSFORMERS_ENV] = "YES"
    elif ours in _FALSE or ours == "":
        if ours or TRANSFORMERS_ENV not in env:
            env[TRANSFORMERS_ENV] = "NO"
    else:
        raise ValueError(
            f"{HUB_KERNELS_ENV}={env[HUB_KERNELS_ENV]!r} is not a yes/no value; set it to 1 to use "
            "transformers' hub kernels or 0 (the default) to keep them off"
        )
    return hub_kernels_enabled(env)


def hub_kernels_enabled(environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """Whether models loaded now would be kernelized (transformers' reading of ``USE_HUB_KERNELS``)."""
    env = os.environ if environ is None else environ
    return env.get(TRANSFORMERS_ENV, "YES").strip().lower() in _TRUE


# opd's own entry points, the same "module:attr" strings as pyproject.toml's [project.entry-points] tables
# (tests/test_entry_points.py keeps the two equal). Installed, opd declares them in its distribution's
# metadata; run from a source tree (`PYTHONPATH=src`, as the GPU check runs on a machine where nothing can
# be installed) there is no metadata, so `entry_points` falls back to this table. Strings, loaded by
# importlib when used: the lab stays unimported until a `lab:` spec or `opd lab` asks for it.
OPD_ENTRY_POINTS: dict[str, dict[str, str]] = {
    "opd.commands": {"lab": "opd.lab.cli:register"},
    "opd.model_schemes": {"lab": "opd.lab.zoo:zoo_path"},
    "opd.model_defaults": {"lab": "opd.lab.zoo:zoo_defaults"},
}
DISTRIBUTION = "opd"


def entry_points(group: str) -> list[EntryPoint]:
    """The entry points of `group`: the installed distributions', plus opd's own (`OPD_ENTRY_POINTS`) when
    no installed ``opd`` distribution declares the group (opd imported from a source tree). An installed
    package's entry point keeps its name; opd's own fill only the names nobody installed claims."""
    from importlib import metadata

    found = list(metadata.entry_points(group=group))
    if not any(_distribution_name(ep) == DISTRIBUTION for ep in found):
        taken = {ep.name for ep in found}
        found += [
            metadata.EntryPoint(name, value, group)
            for name, value in OPD_ENTRY_POINTS.get(group, {}).items()
            if name not in taken
        ]
    return found


def _distribution_name(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return name.lower().replace("_", "-") if isinstance(name, str) else None
