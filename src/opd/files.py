"""Writing files so that a crash or a full disk never leaves half of one, and JSON that strict parsers
read: the two helpers every layer that writes results uses (checkpoints, metrics, eval, reports, lab)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` all at once; a failed write (disk full, ...) leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_safe(x: Any) -> Any:
    """NaN/inf become null: JSON has no NaN and strict parsers (jq, JS) reject Python's spelling."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def jsonl_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a JSON-lines text, split on ``\\n`` only (a CRLF file's ``\\r`` dropped).

    Not `str.splitlines()`: that also breaks at U+2028, U+2029, U+0085 and other characters which JSON
    allows raw inside strings (``json.dumps(..., ensure_ascii=False)`` writes them), so a valid line
    became two invalid halves and every later line number was off. Blank lines are kept (callers skip
    them), so the numbers are the file's own.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no line of its own
    return [(i, line[:-1] if line.endswith("\r") else line) for i, line in enumerate(lines, 1)]
