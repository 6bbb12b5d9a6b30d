"""Pieces every `opd` command module shares: the stderr console, pass-through options, error exit."""

from __future__ import annotations

import contextlib
import errno
import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from opd.errors import InterruptedRun, OpdError, StorageError

# Progress, notes and errors go to stderr so stdout stays clean for data (e.g. `opd config show`).
console = Console(stderr=True, soft_wrap=True)

# Set to 1 to see the traceback behind an error message (`fail`); `opd --debug` sets it.
DEBUG_ENV = "OPD_DEBUG"

# Commands whose every config field is a `--section.field VALUE` option take unknown options through.
PASSTHROUGH = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": ["-h", "--help"],
}


def fail(exc: Exception, code: int = 2) -> None:
    """One red line instead of a traceback; the message is printed literally (no rich markup). An
    exception's own ``exit_code`` (e.g. `opd.errors.InterruptedRun`: 130) wins over ``code``. An OS
    error on a named path is worded by `os_error`.

    With ``OPD_DEBUG=1`` in the environment (the CLI's ``--debug``) the traceback of what caused the
    error (the library exception opd translated, e.g. a torch or gguf error) is printed first: the one
    line is for users, the traceback for a bug report. The red line stays last either way.
    """
    exc = os_error(exc) or exc
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        console.print(Text("".join(traceback.format_exception(exc)), style="dim"))
    console.print(Text.assemble(("error: ", "bold red"), str(exc)))
    raise typer.Exit(getattr(exc, "exit_code", code))


# What to do about an OS error, by errno; `{op}` is the operation (reading / writing) where it is known.
_OS_HINTS = {
    errno.EACCES: "check its owner and mode (`ls -ld PATH`) and run opd as a user who may {op} it, or choose "
    "another path",
    errno.EPERM: "check its owner and mode (`ls -ld PATH`) and run opd as a user who may {op} it, or choose "
    "another path",
    errno.EROFS: "the file system is read-only: choose a path on a writable disk",
    errno.ENOSPC: "the disk is full: free space or choose another disk",
    errno.EDQUOT: "the disk quota is used up: free space or choose another disk",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "it is a directory where a file was expected: choose another path",
    errno.ENOENT: "check the path (a parent directory that does not exist?)",
}


def _operation(path: Path, code: int) -> str | None:
    """What was being done to `path` when it failed, as far as its current state tells: a path that
    does not exist yet was being created (written), one this user may not read was being read."""
    if not path.exists():
        return None if code == errno.ENOENT else "writing"
    if not os.access(path, os.R_OK):
        return "reading"
    if not os.access(path, os.W_OK) or code in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return "writing"
    return None  # e.g. root, whom os.access never refuses


def os_error(exc: BaseException) -> OpdError | None:
    """The one line for an OS error on a named path that reached a command (a run directory this user
    may not write, a file it may not read, a full or read-only disk): the path, the operation where it
    is known, the errno name and what to do; a `StorageError` for writes. None for any other error,
    which keeps its traceback. `--debug` still prints the original traceback (it is the cause)."""
    if not isinstance(exc, OSError) or not exc.filename or exc.errno is None:
        return None
    path = os.fsdecode(exc.filename)
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    op = _operation(Path(path), exc.errno)
    hint = _OS_HINTS.get(exc.errno, "check the path and its disk").replace("PATH", path)
    hint = hint.format(op={"reading": "read", "writing": "write"}.get(op or "", "use"))
    where = f"{op}, {name}" if op else name
    err = (StorageError if op == "writing" else OpdError)(
        f"{(exc.strerror or name).lower()}: {path} ({where}); {hint}"
    )
    err.__cause__ = exc
    return err


def given_options(**kw: Any) -> dict[str, Any]:
    """Only the options the user actually gave, so YAML values are not overwritten by defaults."""
    return {k: v for k, v in kw.items() if v is not None and v != []}


def is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


# What gloo and NCCL say in the surviving processes when another process of the run died or raised.
_PEER_GONE = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "nccl communicator was aborted",
    "remote worker crashing",
)


def peer_failure(exc: BaseException) -> OpdError | None:
    """The one line for a process of a multi-process run whose collective failed because another process
    failed first (the first error, the cause, is in that process's log above): without it every
    surviving rank prints a 60-line torch traceback that buries the real one. None when `exc` is not
    that (a single process, or another error)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    text = str(exc).lower()
    if not (isinstance(exc, RuntimeError) and any(s in text for s in _PEER_GONE)):
        return None
    rank = os.environ.get("RANK", "?")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = next((line for line in lines if any(s in line.lower() for s in _PEER_GONE)), lines[0])
    lost = OpdError(
        f"rank {rank}: another process of this run failed or was killed, so this one stopped too "
        f"(torch: {first[:160]}); the cause is the first error of another rank in the log above"
    )
    lost.__cause__ = exc  # what `opd --debug` prints
    return lost


def startup_interrupted(again: str) -> InterruptedRun:
    """A Ctrl-C while models load (before a command's own SIGINT handling takes over): exit 130 with
    what to rerun, instead of click's bare "Aborted!"."""
    return InterruptedRun(f"interrupted during start-up, before any work was saved; rerun {again}")


def exit_code(exc: OpdError) -> int:
    """3: a non-finite step (stop_on_nan); 4: a declared collapse (stop_on_collapse); 5: the teacher
    servers stayed down (a resume redoes the step); 2: every other expected failure."""
    from opd.teachers.http import TeacherUnavailableError
    from opd.train.alarms import CollapseError
    from opd.train.trainer import NonFiniteLossError

    codes = ((NonFiniteLossError, 3), (CollapseError, 4), (TeacherUnavailableError, 5))
    return next((c for t, c in codes if isinstance(exc, t)), 2)


@contextlib.contextmanager
def training_errors(rerun: str) -> Iterator[None]:
    """How `opd train`, `sft` and `cold-start` end on a failure, in one place: a Ctrl-C while models
    load exits 130 saying what to rerun (`rerun`); a process whose peer died prints one line
    (`peer_failure`); an expected failure is one line with its `exit_code`, an OS error on a named path
    one line (`os_error`); anything else is a bug and keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        fail(startup_interrupted(rerun))
    except RuntimeError as exc:
        lost = peer_failure(exc)
        if lost is None:
            raise
        fail(lost)
    except OpdError as exc:
        fail(exc, exit_code(exc))
    except OSError as exc:  # an unwritable run directory, a full disk: one line when it names the path
        if os_error(exc) is None:
            raise
        fail(exc)


# ----------------------------------------------------------------------------------------------------
# Help: every command's config fields, the main ones in its --help

# Each command that reads a pydantic config: (module, config class, aliases attribute or None, whether
# every field is also a `--field` command-line option). `opd config fields --command NAME` lists NAME's;
# its "unknown option/key" errors point there (`opd.config.options_listing`).
COMMAND_CONFIGS: dict[str, tuple[str, str, str | None, bool]] = {
    "train": ("opd.config", "TrainConfig", "ALIASES", True),
    "sft": ("opd.train.sft", "SFTConfig", "SFT_ALIASES", True),
    "generate": ("opd.recipes.generate", "GenerateConfig", "GENERATE_ALIASES", True),
    "cold-start": ("opd.recipes.cold_start", "ColdStartConfig", None, True),
    "doctor": ("opd.evaluation.doctor", "DoctorConfig", None, True),
    "eval": ("opd.evaluation.eval", "EvalCommandConfig", None, False),
    "serve-teacher": ("opd.teachers.server", "ServeTeacherConfig", None, False),
    "prompts render": ("opd.recipes.prompts", "RenderConfig", None, False),
    "prompts select": ("opd.recipes.prompts", "SelectConfig", None, False),
    "prompts dedup": ("opd.recipes.prompts", "DedupConfig", None, False),
}


def command_config(command: str) -> tuple[Any, dict[str, str], bool]:
    """(config class, {alias: dotted path}, fields-are-options) of `command` (a `COMMAND_CONFIGS` key)."""
    import importlib

    from opd.errors import ConfigError

    if command not in COMMAND_CONFIGS:
        raise ConfigError(f"--command {command!r}: choose one of {', '.join(COMMAND_CONFIGS)}")
    module_name, cls, aliases, options = COMMAND_CONFIGS[command]
    module = importlib.import_module(module_name)
    return getattr(module, cls), dict(getattr(module, aliases)) if aliases else {}, options


def load_command_config(
    command: str,
    config: str | Path | None,
    *,
    options: Mapping[str, Any] | None = None,
    extra: Sequence[str] = (),
) -> Any:
    """`command`'s validated config (class and short aliases from `COMMAND_CONFIGS`): how every command
    builds its config from what the user gave.

    Layers, later winning: the YAML file `config` (optional); the command's named options `options`
    (None and [] are "not given", so they never overwrite the file with defaults); the
    ``--section.field VALUE`` options `extra`. A text value of a named option means what it means after
    ``--section.field`` (`opd.config.parse_overrides`: YAML for a field that is not text, as
    ``--chat-template-kwargs '{enable_thinking: false}'``; null for none where a text field allows it, as
    ``--messages-field null``); numbers, flags and lists, which typer has already typed, are kept as
    they are. Every error is one ConfigError line (an unknown key with its YAML line).
    """
    from opd.config import config_from, deep_merge, parse_overrides

    model, aliases, _ = command_config(command)
    given = given_options(**(options or {}))
    texts = [arg for key, value in given.items() if isinstance(value, str) for arg in (f"--{key}", value)]
    named = {k: v for k, v in given.items() if not isinstance(v, str)}
    named.update(parse_overrides(texts, model, aliases, command))
    return config_from(config, deep_merge(named, parse_overrides(list(extra), model, aliases, command)), model,
                       command)  # fmt: skip


def load_run_config(command: str, config: Path | None, extra: Sequence[str], resume: Path | None,
                    kind: str) -> Any:  # fmt: skip
    """`load_command_config` for a training command (`opd train`, `opd sft`), `--resume RUN_DIR` included:
    the run's own RUN_DIR/config.yaml (unless --config names another file), with run_dir set to RUN_DIR
    and the options `extra` on top. `kind` names what RUN_DIR should be when it has no config.yaml."""
    if resume is None:
        return load_command_config(command, config, extra=extra)
    if not (resume / "config.yaml").is_file() and config is None:
        raise OpdError(f"--resume {resume}: no config.yaml there; is it {kind}?")
    return load_command_config(
        command, config or resume / "config.yaml", extra=[*extra, "--run_dir", str(resume)]
    )


def value_kind(annotation: Any) -> str:
    """What a field takes, for help tables: the choices of a Literal, else INT / FLOAT / BOOL / TEXT /
    LIST / MAPPING (`|null` where null is allowed)."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    nullable = len(args) < len(typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        kind = "|".join(str(a) for a in typing.get_args(annotation))
    elif origin in (typing.Union, types.UnionType):
        kinds = [value_kind(a) for a in args]
        kind = "|".join(dict.fromkeys(kinds))
    elif origin in (list, tuple) or annotation in (list, tuple):
        kind = "LIST"
    elif origin is dict or annotation is dict:
        kind = "MAPPING"
    else:
        kind = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(annotation, "VALUE")
    return f"{kind}|null" if nullable else kind


def config_field_rows(model: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted path, value kind, default as YAML, description) of every settable field of `model`."""
    import json

    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    rows: list[tuple[str, str, str, str]] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += config_field_rows(ann, path + ".")
            continue
        default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
        if default is PydanticUndefined:
            shown = "(required)"
        elif isinstance(default, str):
            shown = default if default else '""'
        else:
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        rows.append((path, value_kind(ann), shown, " ".join((info.description or "").split())))
    return rows


def _option_names(path: str, aliases: dict[str, str]) -> str:
    return ", ".join([f"--{a}" for a, p in aliases.items() if p == path] + [f"--{path}"])


def _main_option_rows(command: str, main: tuple[tuple[str, str], ...]) -> list[tuple[str, str, str]]:
    """(option names, what it takes, one-line help with the default) of each main option of `command`."""
    model, aliases, _ = command_config(command)
    rows = {r[0]: r for r in config_field_rows(model)}
    return [(_option_names(p, aliases), rows[p][1], f"{short} [default: {rows[p][2]}]") for p, short in main]


def _main_options_table(command: str, main: tuple[tuple[str, str], ...]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 1), expand=False)
    table.add_column(no_wrap=True)
    table.add_column()
    for names, kind, short in _main_option_rows(command, main):
        # Text, never markup: help holds brackets ([default: ...], [a, b] examples) that rich would eat.
        table.add_row(Text(names, style="bold cyan"), Text.assemble((f"<{kind}>", "yellow"), " ", short))
    return table


def _main_options_footer(command: str) -> str:
    listing = "opd config fields" + ("" if command == "train" else f" --command {command}")
    return (
        f"Every config field is a --section.field VALUE option (also --section.field=VALUE; - and _ alike), "
        f"on top of --config FILE.yaml: `{listing}` lists them all, `{listing} SECTION` one section "
        "(e.g. loss)."
    )


class ConfigCommand:
    """Mixed into a typer command class by `config_command`: --help also shows the command's main config
    fields (their short forms, what they take, descriptions and defaults), read from its config class."""

    opd_command = "train"
    main_options: tuple[tuple[str, str], ...] = ()  # (dotted path, one-line help)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        import typer.core

        super().format_help(ctx, formatter)  # type: ignore[misc]
        title = "Main options (config fields)"
        if not typer.core.HAS_RICH or getattr(self, "rich_markup_mode", None) is None:
            with formatter.section(title):
                formatter.write_dl(
                    [(f"{n} <{k}>", h) for n, k, h in _main_option_rows(self.opd_command, self.main_options)]
                )
            formatter.write_paragraph()
            formatter.write_text(_main_options_footer(self.opd_command))
            return
        from rich.panel import Panel
        from rich.text import Text
        from typer import rich_utils

        out = rich_utils._get_rich_console() if hasattr(rich_utils, "_get_rich_console") else Console()
        out.print(
            Panel(
                _main_options_table(self.opd_command, self.main_options),
                border_style=getattr(rich_utils, "STYLE_OPTIONS_PANEL_BORDER", "dim"),
                title=title,
                title_align=getattr(rich_utils, "ALIGN_OPTIONS_PANEL", "left"),
            )
        )
        out.print(Text(_main_options_footer(self.opd_command)), style="dim")


def config_command(command: str, main: tuple[tuple[str, str], ...]) -> type:
    """The typer command class (`app.command(cls=...)`) whose --help lists `main`, the most used config
    fields of `command` (a `COMMAND_CONFIGS` key) as (dotted path, one-line help), with their short forms,
    what they take and their defaults, and says how to reach the rest. The config class is
    imported only when help is shown, so `opd --help` stays fast."""
    from typer.core import TyperCommand

    name = "".join(p.capitalize() for p in command.replace("-", " ").split()) + "Command"
    return type(name, (ConfigCommand, TyperCommand), {"opd_command": command, "main_options": main})
