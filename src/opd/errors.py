"""Exceptions opd raises on purpose.

One base class lets the CLI turn every expected failure (bad config, bad data, a model that cannot be
loaded, mismatched tokenizers) into a one-screen message instead of a traceback, while real bugs still
surface as ordinary exceptions.
"""

from __future__ import annotations


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
