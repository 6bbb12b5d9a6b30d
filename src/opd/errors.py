"""Exceptions opd raises on purpose.

One base class lets the CLI turn every expected failure (bad config, bad data, a model that cannot be
loaded, mismatched tokenizers) into a one-screen message instead of a traceback, while real bugs still
surface as ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path


class OpdError(Exception):
    """An expected failure whose message already tells the user what to do."""


class ConfigError(OpdError):
    """A setting is invalid or settings contradict each other."""


class DataError(OpdError):
    """A prompt file or record cannot be used; the message names file:line and field."""


class ModelError(OpdError):
    """A model or tokenizer cannot be loaded or is unfit for the run."""


class TokenizerMismatchError(ModelError):
    """Student and teacher map token ids to different strings, so teacher scores would be meaningless."""


class InterruptedRun(OpdError):
    """SIGINT/SIGTERM stopped a command; the message says what was kept and how to resume (exit 130)."""

    exit_code = 130


class StorageError(OpdError):
    """A write failed (disk full, permissions, ...); the message names the path, the space needed and
    the last good checkpoint, and temporary files are already removed."""


def read_utf8(path: str | Path, error: type[OpdError] = OpdError, what: str = "file") -> str:
    """The text of a file opd reads (prompts, answers, configs), as UTF-8 with or without a BOM.

    Spreadsheets and Windows editors save UTF-8 with a byte-order mark; read as plain UTF-8 it sticks
    to the first CSV header or JSON key (``\\ufeffprompt``), so ``utf-8-sig`` drops it. A file in
    another encoding raises `error` with one line naming the file, the line and the byte, instead of
    a UnicodeDecodeError traceback.
    """
    p = Path(path)
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        byte = raw[exc.start : exc.start + 1].hex()
        sheet = ", or 'CSV UTF-8' in a spreadsheet" if p.suffix.lower() == ".csv" else ""
        raise error(
            f"{p}:{line}: {what} is not valid UTF-8 (byte 0x{byte} at offset {exc.start}: {exc.reason}); "
            f"save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`{sheet})."
        ) from exc
