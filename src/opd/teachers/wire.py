"""The binary framing opd's own scoring server (`opd.teachers.hf_server`) and its client
(`opd.teachers.remote`) share: a JSON header and raw little-endian tensor bytes, never JSON floats.

One message is::

    b"OPDT" | header length (uint32, little-endian) | header (UTF-8 JSON) | tensor bytes, back to back

The header holds the caller's own fields plus ``"tensors"``: for each tensor its name, dtype, shape,
byte offset (from the end of the header) and byte length, so a reader never guesses a size. bfloat16
travels as its two raw bytes per value: the hidden states arrive bit for bit as the server computed them.

Also here, because both sides must compute them the same way: `tensor_digest` (the LM head's hash the
client checks against the server's) and `tokenizer_digest`.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from typing import Any

import torch

__all__ = [
    "CONTENT_TYPE",
    "DTYPES",
    "WireError",
    "decode",
    "encode",
    "tensor_digest",
    "tokenizer_digest",
]

CONTENT_TYPE = "application/x-opd-tensors"
MAGIC = b"OPDT"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A message that is not opd's framing, or is torn (shorter than its header says)."""


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if sys.byteorder != "little":  # pragma: no cover - every machine opd runs on is little-endian
        raise WireError("opd's tensor framing is little-endian; this machine is big-endian")
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def encode(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """One message: `header` (JSON-serialisable) and `tensors` (any of `DTYPES`) as raw bytes."""
    meta, chunks, offset = [], [], 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise WireError(f"tensor {name!r} has dtype {t.dtype}, which the framing does not carry")
        raw = _raw(t)
        meta.append({"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset,
                     "nbytes": len(raw)})  # fmt: skip
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps({**header, "tensors": meta}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *chunks])


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, tensors)`` of one message; the tensors own their memory (CPU)."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise WireError(f"not an opd tensor message (starts {data[:8]!r}); is the server `opd serve-teacher "
                        "--engine hf`?")  # fmt: skip
    (n,) = struct.unpack("<I", data[4:8])
    if len(data) < 8 + n:
        raise WireError(f"torn opd tensor message: header of {n} bytes, {len(data) - 8} received")
    try:
        header = json.loads(data[8 : 8 + n])
    except json.JSONDecodeError as exc:
        raise WireError(f"opd tensor message with an unreadable header: {exc}") from None
    body = memoryview(data)[8 + n :]
    tensors: dict[str, torch.Tensor] = {}
    for m in header.pop("tensors", []):
        dtype = DTYPES.get(m["dtype"])
        if dtype is None:
            raise WireError(f"tensor {m['name']!r} has unknown dtype {m['dtype']!r}")
        end = m["offset"] + m["nbytes"]
        if end > len(body):
            raise WireError(
                f"torn opd tensor message: {m['name']!r} ends at byte {end}, {len(body)} received"
            )
        raw = bytearray(body[m["offset"] : end])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        t = flat.view(dtype).reshape(m["shape"])
        if list(t.shape) != list(m["shape"]):
            raise WireError(f"tensor {m['name']!r}: {m['nbytes']} bytes do not make shape {m['shape']}")
        tensors[m["name"]] = t
    return header, tensors


def tensor_digest(*tensors: torch.Tensor | None, dtype: torch.dtype) -> str:
    """SHA-256 of `tensors` (None skipped) cast to `dtype` and then to float32, with their shapes: the same
    value for the same weights whether they were loaded in float32 and cast or loaded in `dtype`."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            continue
        h.update(json.dumps(list(t.shape)).encode())
        h.update(_raw(t.detach().to(dtype).to(torch.float32)))
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()
