"""Know what the device computes fast before a run commits to a dtype.

On a CPU without bf16 instructions (an AMD EPYC with AVX2 only) a 1024x1024 bf16 matmul ran at ~1 GFLOP/s
against 151 GFLOP/s in fp32, so `student.autocast: bfloat16` turned one training step into 15+ minutes.
A short matmul probe at start-up, cached per machine, lets opd warn or refuse such a choice up front and
name the setting to change, instead of letting the user discover it from a stalled progress bar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from opd.device import synchronize
from opd.errors import ConfigError

__all__ = [
    "POLICIES",
    "apply_tf32",
    "check_dtype_speed",
    "check_dtypes",
    "cpu_flags",
    "default_cache_path",
    "device_description",
    "machine_key",
    "matmul_rates",
]

POLICIES = ("refuse", "warn", "off")
_CACHE_FORMAT = 1
# Names that mean "no reduced-precision compute chosen" (or "whatever the checkpoint has": unknowable here).
_NO_CHECK = {"none", "float32", "fp32", "float", "auto", ""}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
# CPU flags that decide whether a reduced-precision matmul has hardware behind it; quoted in messages.
_CPU_DTYPE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def _dtype_name(dtype: str | torch.dtype) -> str:
    """One spelling per dtype, so cache entries and messages agree whatever alias the config used."""
    name = str(dtype).removeprefix("torch.").strip().lower()
    return _ALIASES.get(name, name)


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dt


def _device(device: torch.device | str) -> torch.device:
    """Pin a bare "cuda" to the current index, so the key and the probe name the GPU actually used."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unreadable, since they only inform."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: torch.device | str) -> str:
    """What the user would call the device (CPU model or GPU name), for messages they can act on."""
    dev = _device(device)
    if dev.type == "cpu":
        return _cpu_model()
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return dev.type


def machine_key(device: torch.device | str) -> str:
    """What the measured rates depend on: the hardware, the torch build (its kernels) and, on CPU, the
    thread count, plus the fp32 matmul precision (TF32 on or off moves the fp32 baseline several-fold). A
    cache shared across machines (a networked home) must never hand one box's rates to another, and a
    change of threads or torch must re-probe."""
    dev = _device(device)
    if dev.type == "cpu":
        flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
        return (
            f"cpu|{_cpu_model()}|flags={flags}|torch={torch.__version__}|threads={torch.get_num_threads()}"
            f"|fp32={torch.get_float32_matmul_precision()}"
        )
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return (
            f"cuda|{torch.cuda.get_device_name(dev)}|sm{major}{minor}|torch={torch.__version__}"
            f"|fp32={torch.get_float32_matmul_precision()}"
        )
    return f"{dev.type}|torch={torch.__version__}"


def _flag(read: Callable[[], object]) -> object:
    """A backend flag as torch reports it; None where torch refuses to say (legacy and new TF32 APIs mixed)."""
    try:
        return read()
    except RuntimeError:
        return None


def apply_tf32(device: torch.device | str, allowed: bool) -> dict[str, object]:
    """Let float32 matmuls (cuBLAS) and convolutions (cuDNN) use TF32 tensor cores on a CUDA `device` when
    `allowed` (the `tf32` setting), full float32 when not; returns what was chosen, for RUN_DIR/device.json.

    A float32 matmul in TF32 runs ~6x faster on an A100/H100 (inputs rounded to a 10-bit mantissa, products
    accumulated in float32), and torch leaves it off for matmuls. Set through the CUDA backends' own flags,
    not `torch.set_float32_matmul_precision("high")`, which (torch 2.13) also switches oneDNN's CPU matmuls
    to TF32. Those flags are the legacy API, so `torch.get_float32_matmul_precision()` (in `machine_key`)
    keeps working; they are process-wide, like the seed. On any other device nothing is changed.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"asked": allowed, "applied": False,
                "why": f"{dev.type} device: TF32 is a CUDA tensor-core mode, nothing was changed"}  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    return {
        "asked": allowed,
        "applied": allowed,
        "cuda_matmul_allow_tf32": _flag(lambda: torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": _flag(lambda: torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": _flag(torch.get_float32_matmul_precision),
        "why": "tf32 true: float32 matmuls and convolutions on TF32 tensor cores" if allowed
        else "tf32 false: full float32 matmuls and convolutions",
    }  # fmt: skip


def default_cache_path() -> Path:
    """Per user, not per run: the probe costs a second or two and the answer outlives any one run."""
    root = os.environ.get("OPD_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "opd"
    return base / "precision.json"


def _probe_enabled() -> bool:
    return os.environ.get("OPD_PRECISION_PROBE", "1").strip().lower() not in ("0", "false", "no", "off")


def _best_rate(a: torch.Tensor, b: torch.Tensor, device: torch.device, seconds: float) -> float:
    """GFLOP/s of `a @ b`: the best of several timed groups within `seconds` (at least one matmul).

    The best, not the mean: another process taking a core stalls every OpenMP barrier for a scheduler
    quantum (seen here: fp32 read 4 GFLOP/s instead of 220 while a neighbour ran), and such noise only
    ever makes a matmul slower, so the fastest group is the closest to what the hardware can do.
    """
    n = a.shape[0]
    flops = 2.0 * n**3
    target = max(seconds / 8, 1e-4)  # one group's length: long enough to outlast the clock's resolution
    best, reps = 0.0, 1
    synchronize(device)
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        synchronize(device)
        t1 = time.perf_counter()
        best = max(best, flops * reps / max(t1 - t0, 1e-9) / 1e9)
        if t1 - start >= seconds:
            return best
        reps = max(1, min(reps * 4, int(reps * target / max(t1 - t0, 1e-9))))


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """GFLOP/s of an n x n matmul in `dtype`; raises where the device cannot do it at all.

    A half-size matmul goes first, as warm-up (kernel choice, lazy init, thread-pool start) and as a
    scout: a 1024^3 bf16 matmul on AVX2 alone takes ~2 s, and a dtype that slow is damning at any size,
    so the full size is timed only when it is affordable. Inputs come from a private generator so the
    probe never moves the run's random stream.
    """
    gen = torch.Generator().manual_seed(0)

    def pair(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(2))

    half = max(n // 2, 64)
    a, b = pair(half)
    torch.matmul(a, b)
    synchronize(device)
    t0 = time.perf_counter()
    torch.matmul(a, b)
    synchronize(device)
    scout = 2.0 * half**3 / max(time.perf_counter() - t0, 1e-9) / 1e9
    if 2.0 * n**3 / (scout * 1e9) > max(1.0, 4 * seconds):
        return max(scout, _best_rate(a, b, device, seconds))
    a, b = pair(n)
    torch.matmul(a, b)
    return _best_rate(a, b, device, seconds)


def _read_cache(path: Path) -> dict[str, dict]:
    """{machine key: entry}; anything unreadable or malformed reads as empty, costing only a re-probe."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        return {}
    machines = data.get("machines")
    if not isinstance(machines, dict):
        return {}
    return {k: v for k, v in machines.items() if isinstance(v, dict) and isinstance(v.get("rates"), dict)}


def _cached_rates(entry: dict | None) -> dict[str, float]:
    if not entry:
        return {}
    out = {}
    for name, rate in entry.get("rates", {}).items():
        if (
            isinstance(rate, (int, float))
            and not isinstance(rate, bool)
            and math.isfinite(rate)
            and rate >= 0
        ):
            out[str(name)] = float(rate)
    return out


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Merge into what is on disk now (other machines may share the file) and swap it in atomically, so a
    concurrent reader sees the old file or the new one, never half of one. Failing to write (read-only
    home) is not worth stopping a run for: the next run just probes again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        machines = _read_cache(path)
        machines[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=".precision-", suffix=".json.tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": _CACHE_FORMAT, "machines": machines}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        pass


def matmul_rates(
    device: torch.device | str,
    dtypes: Iterable[str] = ("float32", "bfloat16", "float16"),
    *,
    cache: Path | None = None,
    seconds: float = 0.15,
    refresh: bool = False,
) -> dict[str, float]:
    """GFLOP/s of an n x n matmul per dtype on `device` (n = 1024 on CPU, 4096 on GPUs), cached per machine.

    Each dtype is timed for about `seconds` in all, in two passes after a warm-up.
    A dtype the device cannot multiply in reads 0.0. Runs at the current torch thread count, since that is
    what training will get. With OPD_PRECISION_PROBE=0 nothing is measured and {} comes back (no check).
    `refresh` measures again even when cached and keeps the better figure per dtype: the checks use it to
    confirm a refusal, so one probe taken under load cannot block every later run on the machine.
    """
    if not _probe_enabled():
        return {}
    dev = _device(device)
    names = list(dict.fromkeys(_dtype_name(d) for d in dtypes))
    torch_dtypes = {name: _torch_dtype(name) for name in names}  # a typo is a bug: raise, never rate it 0
    path = Path(cache) if cache is not None else default_cache_path()
    key = machine_key(dev)
    entry = _read_cache(path).get(key)
    rates = _cached_rates(entry)
    todo = names if refresh else [name for name in names if name not in rates]
    if todo:
        n = 4096 if dev.type == "cuda" else 1024
        # Two interleaved passes, best kept: a burst of load from another process rarely hits one dtype
        # in both, and a bf16 figure depressed while fp32 ran clean is what would wrongly refuse a run.
        fresh: dict[str, float] = {}
        for _ in range(2):
            for name in todo:
                if fresh.get(name) == 0.0:  # no kernel in the first pass: no point asking again
                    continue
                try:
                    rate = float(_time_matmul(dev, torch_dtypes[name], n, seconds / 2))
                except Exception:  # unsupported dtype on this device/build: no kernel, so effectively rate 0
                    rate = 0.0
                fresh[name] = max(fresh.get(name, 0.0), rate)
        for name, rate in fresh.items():
            rates[name] = max(rates.get(name, 0.0), rate)
        _write_cache(
            path,
            key,
            {
                "device": device_description(dev),
                "n": n,
                "rates": rates,
                "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    return {name: rates[name] for name in names}


def _fmt_rate(rate: float) -> str:
    return f"{rate:.1f}" if rate < 10 else f"{rate:.0f}"


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def _where(device: torch.device, dtype: str) -> str:
    """The device in words, plus (on CPU) whether it has the instructions this dtype needs."""
    desc = device_description(device)
    wanted = _CPU_DTYPE_FLAGS.get(dtype)
    if device.type != "cpu" or not wanted:
        return desc
    flags = cpu_flags()
    if not flags:
        return desc
    have = [f for f in wanted if f in flags]
    if have:
        return f"{desc}; this CPU has {'/'.join(have)}"
    return f"{desc}; this CPU has no {'/'.join(wanted)}"


def _fallback_for(setting: str) -> str:
    """The value that turns reduced precision off: `none` for autocast switches, fp32 for weight dtypes."""
    return "none" if setting.rsplit(".", 1)[-1] == "autocast" else "float32"


def _slowdown(rates: Mapping[str, float], name: str) -> float | None:
    """fp32's rate over `name`'s (inf when `name` has no kernel); None when there is nothing to compare."""
    base, rate = rates.get("float32"), rates.get(name)
    if not base or rate is None:
        return None
    return math.inf if rate <= 0 else base / rate


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"precision_check={policy!r}: must be one of {', '.join(POLICIES)}")


def check_dtype_speed(
    device: torch.device | str,
    dtype: str,
    setting: str,
    *,
    policy: str = "refuse",
    warn_ratio: float = 2.0,
    refuse_ratio: float = 8.0,
    rates: Mapping[str, float] | None = None,
    fallback: str | None = None,
) -> str | None:
    """Compare the chosen dtype's matmul rate with fp32's on this device: None when it is fine, a warning
    string when it is notably slower, ConfigError when it is so much slower that the run would crawl.

    `setting` is the config key that chose `dtype` (e.g. "student.autocast"); every message names it and
    the value to set instead (`fallback`, by default "none" for autocast keys and "float32" otherwise).
    `policy` is the run's precision_check: "warn" downgrades refusals to warnings, "off" skips the probe.
    """
    _check_policy(policy)
    name = _dtype_name(dtype)
    if policy == "off" or name in _NO_CHECK:
        return None
    _torch_dtype(name)  # a typo'd dtype is a bug upstream of here, not a slow device
    dev = _device(device)
    if rates is None:
        rates = matmul_rates(dev, ("float32", name))
        seen = _slowdown(rates, name)
        if policy == "refuse" and seen is not None and seen >= refuse_ratio:
            rates = matmul_rates(dev, ("float32", name), refresh=True)  # confirm before blocking the run
    slowdown = _slowdown(rates, name)
    if slowdown is None:  # probing disabled, or nothing to compare against
        return None
    base, rate = rates["float32"], rates[name]
    if slowdown < warn_ratio:
        return None
    fix = fallback if fallback is not None else _fallback_for(setting)
    where = _where(dev, name)
    if math.isinf(slowdown):
        what = f"{setting}={name}: this device ({where}) cannot run a {name} matmul at all (float32: "
        what += f"{_fmt_rate(base)} GFLOP/s)"
    else:
        what = (
            f"{setting}={name}: a {name} matmul runs at {_fmt_rate(rate)} GFLOP/s on this device ({where}), "
            f"{_fmt_ratio(slowdown)} slower than float32 ({_fmt_rate(base)} GFLOP/s)"
        )
    if slowdown >= refuse_ratio:
        if policy == "refuse":
            raise ConfigError(f"{what}; set {setting} {fix} (or precision_check warn to go ahead anyway)")
        return f"{what}; going ahead because precision_check is warn (set {setting} {fix} for speed)"
    return f"{what}; set {setting} {fix} for speed (precision_check off silences this)"


def check_dtypes(
    device: torch.device | str,
    choices: Mapping[str, str],
    *,
    policy: str = "refuse",
    log: Callable[[str], object] | None = None,
    warn_ratio: float = 2.0,
    refuse_ratio: float = 8.0,
    rates: Mapping[str, float] | None = None,
) -> list[str]:
    """Check several `{setting: dtype}` choices against one probe; `log` each warning and return them.

    Every refusal is collected before raising, so one ConfigError lists all the settings to change rather
    than making the user fix them one failed start at a time.
    """
    _check_policy(policy)
    names = [_dtype_name(d) for d in choices.values()]
    wanted = [n for n in dict.fromkeys(names) if n not in _NO_CHECK]
    if policy == "off" or not wanted:
        return []
    if rates is None:
        rates = matmul_rates(device, ["float32", *wanted])
        worst = max((_slowdown(rates, n) or 0.0) for n in wanted)
        if policy == "refuse" and worst >= refuse_ratio:
            rates = matmul_rates(device, ["float32", *wanted], refresh=True)  # confirm before refusing
    if not rates:
        return []
    warnings: list[str] = []
    refusals: list[str] = []
    for setting, dtype in choices.items():
        try:
            msg = check_dtype_speed(
                device,
                dtype,
                setting,
                policy=policy,
                warn_ratio=warn_ratio,
                refuse_ratio=refuse_ratio,
                rates=rates,
            )
        except ConfigError as e:
            refusals.append(str(e))
            continue
        if msg:
            warnings.append(msg)
            if log is not None:
                log(msg)
    if refusals:
        raise ConfigError("\n".join(refusals))
    return warnings
