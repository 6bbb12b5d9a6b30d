"""The dtype speed check: a bf16 choice on a CPU without bf16 hardware must be caught before the run starts,
and the probe behind it must be cheap (cached per machine) and robust (a bad cache file costs a re-probe)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opd import precision
from opd.errors import ConfigError

# The EPYC figures from the issue: bf16 ~150x slower than fp32, fp16 unsupported.
EPYC = {"float32": 151.0, "bfloat16": 1.0, "float16": 0.0}


@pytest.fixture(autouse=True)
def _probe_on(monkeypatch, tmp_path: Path):
    """Probing on, and the default cache in a scratch dir: a test must never write the user's cache."""
    monkeypatch.delenv("OPD_PRECISION_PROBE", raising=False)
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "opd-cache"))


@pytest.fixture
def fake_timer(monkeypatch) -> list[tuple[str, int]]:
    """Replace the timed matmul with a counter, so cache behaviour is tested without timing anything."""
    calls: list[tuple[str, int]] = []
    fake = {torch.float32: 100.0, torch.bfloat16: 4.0}

    def timer(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
        calls.append((str(dtype), n))
        if dtype not in fake:
            raise RuntimeError(f"no kernel for {dtype}")
        return fake[dtype]

    monkeypatch.setattr(precision, "_time_matmul", timer)
    return calls


def test_cache_round_trip_does_not_reprobe(tmp_path: Path, fake_timer):
    cache = tmp_path / "sub" / "precision.json"
    first = precision.matmul_rates("cpu", cache=cache)
    assert first == {"float32": 100.0, "bfloat16": 4.0, "float16": 0.0}  # fp16 raised: unsupported, 0.0
    # two passes per dtype; the one that raised is not asked again
    assert [d for d, _ in fake_timer] == ["torch.float32", "torch.bfloat16", "torch.float16"] + [
        "torch.float32",
        "torch.bfloat16",
    ]
    assert all(n == 1024 for _, n in fake_timer)
    data = json.loads(cache.read_text())
    entry = data["machines"][precision.machine_key("cpu")]
    assert entry["rates"] == first and entry["n"] == 1024
    assert not list(cache.parent.glob("*.tmp"))  # the atomic write left no temp file behind

    assert precision.matmul_rates("cpu", cache=cache) == first
    assert precision.matmul_rates("cpu", ("bf16",), cache=cache) == {"bfloat16": 4.0}
    assert len(fake_timer) == 5


def test_cache_keeps_other_machines_and_probes_only_missing_dtypes(tmp_path: Path, fake_timer):
    cache = tmp_path / "precision.json"
    other = {"rates": {"float32": 1.0}, "device": "elsewhere", "n": 1024}
    cache.write_text(json.dumps({"format": 1, "machines": {"other-box": other}}))
    precision.matmul_rates("cpu", ("float32",), cache=cache)
    precision.matmul_rates("cpu", ("float32", "bfloat16"), cache=cache)
    assert [d for d, _ in fake_timer] == ["torch.float32"] * 2 + ["torch.bfloat16"] * 2
    machines = json.loads(cache.read_text())["machines"]
    assert machines["other-box"] == other
    assert machines[precision.machine_key("cpu")]["rates"] == {"float32": 100.0, "bfloat16": 4.0}


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"format": 1, "machines": 3}',
        b'{"format": 99, "machines": {}}',
        b"\xff\xfe\x00",
        b"",
    ],
)
def test_corrupt_cache_is_ignored_and_replaced(tmp_path: Path, fake_timer, content: bytes):
    cache = tmp_path / "precision.json"
    cache.write_bytes(content)
    assert precision.matmul_rates("cpu", ("float32",), cache=cache) == {"float32": 100.0}
    assert len(fake_timer) == 2
    assert json.loads(cache.read_text())["format"] == 1


def test_bad_cached_values_are_reprobed(tmp_path: Path, fake_timer):
    cache = tmp_path / "precision.json"
    key = precision.machine_key("cpu")
    cache.write_text(
        json.dumps({"format": 1, "machines": {key: {"rates": {"float32": "fast", "bfloat16": -1}}}})
    )
    assert precision.matmul_rates("cpu", ("float32", "bfloat16"), cache=cache) == {
        "float32": 100.0,
        "bfloat16": 4.0,
    }


def test_unwritable_cache_does_not_crash(tmp_path: Path, fake_timer):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache directory should be
    assert precision.matmul_rates("cpu", ("float32",), cache=blocker / "precision.json") == {"float32": 100.0}


def test_default_cache_path_follows_env(tmp_path: Path, monkeypatch):
    assert precision.default_cache_path() == tmp_path / "opd-cache" / "precision.json"
    monkeypatch.delenv("OPD_CACHE_DIR")
    assert precision.default_cache_path() == Path.home() / ".cache" / "opd" / "precision.json"


def test_machine_key_depends_on_thread_count():
    threads = torch.get_num_threads()
    try:
        a = precision.machine_key("cpu")
        torch.set_num_threads(threads + 1)
        b = precision.machine_key("cpu")
    finally:
        torch.set_num_threads(threads)
    assert a != b
    assert torch.__version__ in a and f"threads={threads}" in a


def test_cpu_flags_is_a_set():
    flags = precision.cpu_flags()
    assert isinstance(flags, set)
    if Path("/proc/cpuinfo").exists() and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert flags  # a Linux x86/arm box lists its flags


def test_probe_disabled_returns_empty(tmp_path: Path, monkeypatch, fake_timer):
    monkeypatch.setenv("OPD_PRECISION_PROBE", "0")
    cache = tmp_path / "precision.json"
    assert precision.matmul_rates("cpu", cache=cache) == {}
    assert precision.check_dtype_speed("cpu", "bfloat16", "student.autocast") is None
    assert precision.check_dtypes("cpu", {"student.autocast": "bfloat16"}) == []
    assert not fake_timer and not cache.exists()


def test_real_probe_on_this_cpu(tmp_path: Path):
    rates = precision.matmul_rates("cpu", ("float32", "bfloat16"), cache=tmp_path / "p.json", seconds=0.05)
    assert rates["float32"] > 0 and math.isfinite(rates["float32"])
    assert rates["bfloat16"] >= 0


def test_unknown_dtype_name_is_a_bug_not_a_slow_device(tmp_path: Path, fake_timer):
    with pytest.raises(ValueError, match="bfloat17"):
        precision.matmul_rates("cpu", ("bfloat17",), cache=tmp_path / "p.json")


# --- check_dtype_speed with injected rates -------------------------------------------------------


def test_fast_dtype_passes():
    rates = {"float32": 100.0, "bfloat16": 600.0}
    assert precision.check_dtype_speed("cpu", "bfloat16", "student.autocast", rates=rates) is None
    rates = {"float32": 100.0, "bfloat16": 60.0}  # 1.7x slower: under warn_ratio
    assert precision.check_dtype_speed("cpu", "bf16", "student.autocast", rates=rates) is None


def test_moderately_slow_dtype_warns():
    msg = precision.check_dtype_speed(
        "cpu", "bfloat16", "student.autocast", rates={"float32": 100.0, "bfloat16": 25.0}
    )
    assert msg is not None
    assert "student.autocast=bfloat16" in msg
    assert "25 GFLOP/s" in msg and "4.0x slower" in msg and "float32 (100 GFLOP/s)" in msg
    assert "set student.autocast none" in msg
    assert precision.device_description("cpu") in msg


def test_very_slow_dtype_is_refused():
    with pytest.raises(ConfigError) as err:
        precision.check_dtype_speed("cpu", "bfloat16", "student.autocast", rates=EPYC)
    text = str(err.value)
    assert text.startswith(
        "student.autocast=bfloat16: a bfloat16 matmul runs at 1.0 GFLOP/s on this device ("
    )
    assert "151x slower than float32 (151 GFLOP/s)" in text
    assert "set student.autocast none" in text and "precision_check warn" in text


def test_weight_dtype_fallback_is_float32():
    with pytest.raises(ConfigError, match="set teacher.dtype float32"):
        precision.check_dtype_speed("cpu", "bfloat16", "teacher.dtype", rates=EPYC)


def test_unsupported_dtype_is_refused():
    with pytest.raises(ConfigError) as err:
        precision.check_dtype_speed("cpu", "float16", "student.autocast", rates=EPYC)
    text = str(err.value)
    assert "student.autocast=float16" in text and "cannot run a float16 matmul" in text
    assert "precision_check" in text


def test_policy_warn_never_raises():
    for dtype in ("bfloat16", "float16"):
        msg = precision.check_dtype_speed("cpu", dtype, "student.autocast", policy="warn", rates=EPYC)
        assert msg is not None and "student.autocast" in msg and "precision_check is warn" in msg


def test_policy_off_and_no_check_dtypes_do_not_probe(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("probed")

    monkeypatch.setattr(precision, "matmul_rates", boom)
    assert precision.check_dtype_speed("cpu", "bfloat16", "student.autocast", policy="off") is None
    for dtype in ("none", "float32", "auto"):
        assert precision.check_dtype_speed("cpu", dtype, "student.autocast") is None
    assert precision.check_dtypes("cpu", {"student.autocast": "none", "teacher.dtype": "auto"}) == []
    assert precision.check_dtypes("cpu", {"student.autocast": "bfloat16"}, policy="off") == []


def test_bad_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="precision_check"):
        precision.check_dtype_speed("cpu", "bfloat16", "student.autocast", policy="maybe", rates=EPYC)


def test_cpu_message_names_missing_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(ConfigError, match="this CPU has no avx512_bf16/amx_bf16"):
        precision.check_dtype_speed("cpu", "bfloat16", "student.autocast", rates=EPYC)


# --- check_dtypes -----------------------------------------------------------------------------


def test_check_dtypes_probes_once_and_logs_warnings(monkeypatch):
    calls: list[list[str]] = []

    def rates(device, dtypes, **kwargs):
        calls.append(list(dtypes))
        return {"float32": 100.0, "bfloat16": 30.0, "float16": 40.0}

    monkeypatch.setattr(precision, "matmul_rates", rates)
    logged: list[str] = []
    choices = {"student.autocast": "bfloat16", "teacher.dtype": "float16", "student.dtype": "float32"}
    out = precision.check_dtypes("cpu", choices, policy="refuse", log=logged.append)
    assert len(calls) == 1 and set(calls[0]) == {"float32", "bfloat16", "float16"}
    assert out == logged and len(out) == 2
    assert "student.autocast=bfloat16" in out[0] and "teacher.dtype=float16" in out[1]


def test_check_dtypes_refusal_lists_every_offender():
    choices = {"student.autocast": "bfloat16", "teacher.dtype": "float16"}
    with pytest.raises(ConfigError) as err:
        precision.check_dtypes("cpu", choices, policy="refuse", log=print, rates=EPYC)
    assert "student.autocast" in str(err.value) and "teacher.dtype" in str(err.value)
    logged: list[str] = []
    out = precision.check_dtypes("cpu", choices, policy="warn", log=logged.append, rates=EPYC)
    assert len(out) == 2 and out == logged


def test_best_pass_is_kept_and_a_late_failure_does_not_zero(tmp_path: Path, monkeypatch):
    """Load from another process only slows a matmul, so the faster pass is the truer figure."""
    figures = {torch.float32: [50.0, 200.0], torch.bfloat16: [400.0, RuntimeError("flaky")]}

    def timer(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
        value = figures[dtype].pop(0)
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(precision, "_time_matmul", timer)
    rates = precision.matmul_rates("cpu", ("float32", "bfloat16"), cache=tmp_path / "p.json")
    assert rates == {"float32": 200.0, "bfloat16": 400.0}


def test_refusal_is_confirmed_by_a_fresh_probe(monkeypatch):
    """A cached bf16 figure taken under load must not block runs forever: refusing re-measures first."""
    bf16 = [1.0, 1.0, 300.0, 300.0]  # first probe (two passes) depressed, the confirming one clean

    def timer(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
        return 100.0 if dtype == torch.float32 else bf16.pop(0)

    monkeypatch.setattr(precision, "_time_matmul", timer)
    assert precision.check_dtype_speed("cpu", "bfloat16", "student.autocast") is None
    assert not bf16
    cached = json.loads(precision.default_cache_path().read_text())["machines"]
    assert cached[precision.machine_key("cpu")]["rates"]["bfloat16"] == 300.0


def test_confirmed_refusal_raises(monkeypatch):
    calls: list[str] = []

    def timer(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
        calls.append(str(dtype))
        return 150.0 if dtype == torch.float32 else 1.0

    monkeypatch.setattr(precision, "_time_matmul", timer)
    with pytest.raises(ConfigError, match="student.autocast=bfloat16"):
        precision.check_dtypes("cpu", {"student.autocast": "bfloat16", "teacher.dtype": "float32"})
    assert calls.count("torch.bfloat16") == 4  # probe + confirming probe, two passes each


def test_cuda_key_size_and_message_without_a_gpu(tmp_path: Path, monkeypatch, fake_timer):
    """The GPU path's bookkeeping (key, 4096 matmul, GPU name in the text), with torch.cuda faked."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (7, 0))
    key = precision.machine_key("cuda")
    assert key.startswith("cuda|NVIDIA Tesla V100-SXM2-16GB|sm70|torch=")
    rates = precision.matmul_rates("cuda", ("float32", "bfloat16"), cache=tmp_path / "p.json")
    assert rates == {"float32": 100.0, "bfloat16": 4.0} and {n for _, n in fake_timer} == {4096}
    with pytest.raises(ConfigError, match=r"on this device \(NVIDIA Tesla V100-SXM2-16GB\), 25x slower"):
        precision.check_dtype_speed("cuda:0", "bfloat16", "student.autocast", rates=rates)
