"""transformers' hub kernels: off in opd unless asked (`opd.runtime`), for every command and library use.

transformers >= 5.25 kernelizes every model on `train()`/`eval()` by default (hub downloads at run time,
other numerics; on a CPU-only torch a crash in `torch.cuda.get_device_capability()`): these tests load a
real saved model through opd's loader and watch whether transformers calls `kernelize`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import transformers.modeling_utils as modeling_utils

from opd.models.loading import load_model
from opd.runtime import HUB_KERNELS_ENV, TRANSFORMERS_ENV, configure_hub_kernels, hub_kernels_enabled


@pytest.mark.parametrize(
    ("env", "expected_value", "on"),
    [
        ({}, "NO", False),  # the default: off
        ({HUB_KERNELS_ENV: "1"}, "YES", True),
        ({HUB_KERNELS_ENV: "yes", TRANSFORMERS_ENV: "NO"}, "YES", True),  # opd's variable wins
        ({HUB_KERNELS_ENV: "0", TRANSFORMERS_ENV: "YES"}, "NO", False),
        ({TRANSFORMERS_ENV: "YES"}, "YES", True),  # transformers' own variable, set by the user, is respected
        ({TRANSFORMERS_ENV: "off"}, "off", False),
    ],
)
def test_the_switch(env, expected_value, on):
    env = dict(env)
    assert configure_hub_kernels(env) is on
    assert env[TRANSFORMERS_ENV] == expected_value
    assert hub_kernels_enabled(env) is on


def test_a_bad_value_is_an_error_naming_the_variable():
    with pytest.raises(ValueError, match=r"OPD_HUB_KERNELS='maybe'.*set it to 1"):
        configure_hub_kernels({HUB_KERNELS_ENV: "maybe"})


def test_importing_opd_turns_them_off():
    env = {k: v for k, v in os.environ.items() if k not in (HUB_KERNELS_ENV, TRANSFORMERS_ENV)}
    out = subprocess.run(
        [sys.executable, "-c", "import os, opd; print(os.environ['USE_HUB_KERNELS'])"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "NO"


@pytest.mark.parametrize("asked", [False, True])
def test_loaded_models_are_kernelized_only_when_asked(tiny_pair, monkeypatch, asked):
    """The real loader and `model.train()` (the call that crashed `opd sft` on transformers 5.25)."""
    calls = []
    monkeypatch.setattr(modeling_utils, "kernelize", lambda model, **kw: calls.append(type(model).__name__))
    monkeypatch.delenv(TRANSFORMERS_ENV, raising=False)
    monkeypatch.setenv(HUB_KERNELS_ENV, "1" if asked else "0")
    configure_hub_kernels()
    model = load_model(str(tiny_pair["student"]))
    model.train()
    model.eval()
    if not modeling_utils.is_kernels_available():  # transformers without the `kernels` package: never
        assert calls == []
        return
    assert bool(calls) is asked  # with kernels off, transformers never reaches `kernelize`
    if not asked:
        assert model.use_kernels is False
