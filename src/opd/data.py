"""Prompt files, prompt templates, tokenisation limits and the resumable prompt cursor.

Everything here fails early and loudly: a bad record found at step 3,000 of a GPU run wastes hours,
so `load_prompts` validates every record up front and every error names `file:line` (or `file:row N`)
and the field, and says what to do about it.

Template grammar (the `template` argument of `render_prompt`, a config string):

=================  ==========================================================================
``raw``            the prompt text exactly as in the file (no chat template)
``chat``           the tokenizer's chat template; a text prompt becomes one user message
``<name>``         a named template from `TEMPLATES` (``dapo``, ``boxed``), result used as raw text
``<format>``       any string containing ``{prompt}``, filled by plain substitution (not
                   `str.format`, so literal braces such as ``\\boxed{}`` survive)
``chat:<x>``       fill ``<name>``/``<format>`` first, then wrap it as the chat user message
=================  ==========================================================================

For records that carry `messages`, only chat templates apply; ``chat:<x>`` fills the last user
message. Templates are how a run aligns its prompts with the teacher's own format (paper, Recipe B),
so the rendered text is meant to be shown for both models at start-up.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opd.errors import ConfigError, DataError, read_utf8
from opd.files import jsonl_lines

# DAPO-Math-17K's own wording (the paper's default prompt set), instruction first, problem in the middle
# and the reminder last, so that students see training prompts exactly as the DAPO data spells them.
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{prompt}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
# The teacher-aligned template of the paper (Qwen/DeepSeek math post-training format).
BOXED_TEMPLATE = "{prompt} Please reason step by step, and put your final answer within \\boxed{}."

TEMPLATES: dict[str, str] = {"dapo": DAPO_TEMPLATE, "boxed": BOXED_TEMPLATE}

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}

# The roles chat templates are written for (OpenAI's `developer` included). A template drops a role it does
# not know (refused by `check_rendered`) or renders it as a turn of that name (ChatML: `<|im_start|>human`),
# which the model has most likely never seen in training; `load_prompts` warns about the second kind.
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer")

log = logging.getLogger(__name__)


def option_names(prefix: str, *, dashes: bool = False) -> dict[str, str]:
    """How a command spells the settings this module's messages name: ``prefix + field`` for each field
    (``dashes``: ``max-prompt-tokens`` for ``max_prompt_tokens``).

    Every hint names an option of the command that prints it: `opd train` takes ``data.max_prompt_tokens``,
    `opd eval` ``--max-prompt-tokens``, `opd doctor` ``--max_prompt_tokens``. A value starting with ``--``
    is a command-line option (hints then say ``--template chat``), any other a config key
    (``data.template: chat``). Callers change single entries for settings spelled otherwise (the
    in-loop evaluator's prompt file is ``eval.prompts``).
    """
    fields = ("prompts", "prompt_field", "messages_field", "template", "chat_template_kwargs", "system_prompt",
              "max_prompt_tokens")  # fmt: skip
    return {f: prefix + (f.replace("_", "-") if dashes else f) for f in fields}


# `opd train`'s spelling (its config's data section), the default of every function here.
TRAIN_OPTIONS: Mapping[str, str] = option_names("data.")


def _set_to(options: Mapping[str, str], field: str, value: str) -> str:
    """`field` set to `value` as the user writes it: ``--template chat`` or ``data.template: chat``."""
    name = options[field]
    return f"{name} {value}" if name.startswith("--") else f"{name}: {value}"


@dataclass
class PromptRecord:
    """One prompt as read from a file; exactly one of `text` and `messages` is set.

    `source` travels with the record so that every later failure (too long, bad template) can point the
    user at the line to fix; `raw` keeps the whole row for verifiers and logging.
    """

    text: str | None
    messages: list[dict[str, Any]] | None
    answer: str | None
    source: str
    raw: dict[str, Any] = field(repr=False)


# --------------------------------------------------------------------------------------------------
# Loading


def load_prompts(
    path: str | Path,
    *,
    prompt_field: str | None = "prompt",
    messages_field: str | None = "messages",
    answer_field: str | None = "answer",
    options: Mapping[str, str] = TRAIN_OPTIONS,
) -> list[PromptRecord]:
    """Read and validate every record of a JSONL / Parquet / CSV prompt file.

    Field names may be dotted paths into nested objects (``reward_model.ground_truth``, as in verl's
    DAPO parquet). A prompt field holding a list of ``{role, content}`` messages is read as messages,
    which is how verl-style datasets store chat prompts. Pass ``None`` for a field to ignore it, e.g.
    when a file has both a ``prompt`` and a ``messages`` column and you want only one. `options`: how
    the calling command spells the settings the errors name (`option_names`). Messages with a role
    outside `KNOWN_ROLES` are logged as a warning, once per role, naming the first record using it.
    """
    p = Path(path).expanduser()
    where = options["prompts"]
    if not p.exists():
        raise DataError(f"{p}: prompt file not found; check {where} (paths are relative to the cwd).")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; {where} must name a .jsonl, .parquet or .csv file.")
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"{p}: unknown prompt file extension {p.suffix!r}; use .jsonl (or .json lines), .parquet or .csv."
        )
    rows = {"jsonl": read_jsonl, "parquet": _read_parquet, "csv": _read_csv}[kind](p)
    records = [
        _to_record(
            row, source, prompt_field, messages_field, answer_field, csv_cells=kind == "csv", options=options
        )
        for source, row in rows
    ]
    if not records:
        raise DataError(f"{p}: no records found (the file is empty); add prompts or point {where} elsewhere.")
    _warn_unknown_roles(records)
    return records


def prompt_columns(cfg: Any) -> dict[str, str | None]:
    """The prompt-file columns a config names (its `prompt_field`, `messages_field` and `answer_field`,
    `opd.config.PromptColumn` ...) as `load_prompts`' keyword arguments."""
    return {name: getattr(cfg, name) for name in ("prompt_field", "messages_field", "answer_field")}


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (read a MiB at a time): how a resumed job knows its data file is the
    one it started on (`opd sft`'s data, `opd generate`'s prompts)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _warn_unknown_roles(records: Sequence[PromptRecord]) -> None:
    """One warning per role outside `KNOWN_ROLES`, naming the first record that uses it.

    A warning, not an error: some templates are made for roles of their own (Llama 3.1's ``ipython``,
    GLM's ``observation``) and their models were trained on them, so refusing would block real data; a
    template that drops the role is refused anyway when the prompt is rendered (`check_rendered`). The
    common case is a ShareGPT-style file (``human``/``gpt``), which a ChatML template renders as an
    ``<|im_start|>human`` turn without complaint: the run goes on, on prompts the model reads as odd text.
    """
    first: dict[str, tuple[str, int]] = {}
    count: dict[str, int] = {}
    for r in records:
        for i, m in enumerate(r.messages or ()):
            role = m["role"]
            if role not in KNOWN_ROLES:
                first.setdefault(role, (r.source, i))
                count[role] = count.get(role, 0) + 1
    for role, (source, i) in first.items():
        log.warning(
            f"{source}: message {i} has role {role!r} ({count[role]} message(s) in the file), not one of "
            f"{', '.join(KNOWN_ROLES)}: a chat template renders it as a {role!r} turn (or drops it, which is "
            "refused), and the model was most likely trained on user/assistant turns only; rename the role "
            "to 'user' (ShareGPT's 'human'/'gpt' are 'user'/'assistant') unless the model's template is made "
            "for it."
        )


def read_jsonl(p: Path, what: str = "prompt file") -> list[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) of every non-blank line of a JSON-lines file, or (``file:row N``, object)
    of a whole-file JSON array; a line that is not one JSON object fails naming it. `what` names the
    file in encoding errors. The reader of prompt files and of `opd sft`'s data."""
    text = read_utf8(p, DataError, what)  # BOM or not; other encodings fail naming file:line
    if text.lstrip().startswith("["):
        # A whole-file JSON array (a common .json export) rather than JSON lines.
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); fix the file or write JSON lines."
            ) from e
        return [(f"{p}:row {i}", _require_object(item, f"{p}:row {i}")) for i, item in enumerate(items, 1)]
    out = []
    for lineno, line in jsonl_lines(text):
        if not line.strip():
            continue
        source = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{source}: invalid JSON ({e.msg}, column {e.colno}); each line must be one JSON object."
            ) from e
        out.append((source, _require_object(obj, source)))
    return out


def _require_object(obj: Any, source: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(
            f'{source}: expected a JSON object like {{"prompt": ...}}, got {type(obj).__name__}; '
            "each record must be an object."
        )
    return obj


def _read_parquet(p: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{p}: cannot read as Parquet ({e}); check the file is a valid .parquet file.") from e
    return [(f"{p}:row {i}", row) for i, row in enumerate(rows, 1)]


def _read_csv(p: Path) -> list[tuple[str, dict[str, Any]]]:
    # Spreadsheets save "CSV UTF-8" with a BOM, which read_utf8 drops before it can stick to the first
    # header ("\ufeffprompt"); newline="" keeps quoted multi-line cells intact, as the csv module wants.
    # strict: an unclosed quote is an error (not a cell that swallows the following rows up to the end of
    # the file), and so is a row with more or fewer fields than the header (not silently padded or cut).
    reader = csv.DictReader(io.StringIO(read_utf8(p, DataError, "prompt file"), newline=""), strict=True)
    out = []
    start = 1  # the line the record being read starts on (a quoted cell may span lines)
    try:
        width = len(reader.fieldnames or ())
        start = reader.line_num + 1
        # Row numbers count data records from 1 (the header is not a row), matching Parquet.
        for i, row in enumerate(reader, 1):
            if None in row or any(v is None for v in row.values()):
                got = width + len(row.get(None) or ()) - sum(v is None for v in row.values())
                raise DataError(
                    f"{p}:{start}: row {i} has {got} field(s), the header has {width}; "
                    'quote cells that hold commas ("a, b") or fix the row.'
                )
            out.append((f"{p}:row {i}", dict(row)))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(
            f"{p}:{start}: not a readable CSV file ({e}) in the record that starts on this line: a quote "
            "opened there is never closed, or a cell has a stray quote; fix the quoting or save it as JSONL."
        ) from e
    return out


def _lookup(row: dict[str, Any], name: str | None) -> Any:
    """A field by name, or by dotted path into nested dicts when no top-level key has that name."""
    if name is None:
        return None
    if name in row:
        return row[name]
    cur: Any = row
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _is_missing(value: Any, csv_cells: bool) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):  # pandas-written parquet marks nulls as NaN
        return True
    return csv_cells and value == ""  # an empty CSV cell means "no value"


def _to_record(
    row: dict[str, Any],
    source: str,
    prompt_field: str | None,
    messages_field: str | None,
    answer_field: str | None,
    *,
    csv_cells: bool,
    options: Mapping[str, str],
) -> PromptRecord:
    prompt = _lookup(row, prompt_field)
    messages = _lookup(row, messages_field)
    prompt = None if _is_missing(prompt, csv_cells) else prompt
    messages = None if _is_missing(messages, csv_cells) else messages
    if isinstance(prompt, list):
        if messages is not None:
            raise DataError(
                f"{source}: both {prompt_field!r} (a message list) and {messages_field!r} are set; "
                f"keep one, or set the other field name ({options['messages_field']}) to null."
            )
        messages, prompt = prompt, None
        messages_field = prompt_field
    if prompt is None and messages is None:
        fields = " nor ".join(repr(f) for f in (prompt_field, messages_field) if f)
        keys = ", ".join(sorted(str(k) for k in row)) or "none"
        raise DataError(
            f"{source}: record has neither {fields} (its fields: {keys}); "
            f"add one, or set {options['prompt_field']} / {options['messages_field']} to the right column."
        )
    if prompt is not None and messages is not None:
        raise DataError(
            f"{source}: both {prompt_field!r} and {messages_field!r} are set; keep one, or set the other "
            f"field name ({options['prompt_field']} / {options['messages_field']}) to null."
        )
    text = None
    if prompt is not None:
        if not isinstance(prompt, str):
            raise DataError(
                f"{source}: field {prompt_field!r} must be a string, got {type(prompt).__name__} "
                f"({_short(prompt)}); quote it in the file."
            )
        if not prompt.strip():
            raise DataError(f"{source}: field {prompt_field!r} is empty; remove the record or fill it in.")
        text = prompt
    else:
        messages = check_messages(messages, source, str(messages_field), csv_cells=csv_cells)
    answer = _lookup(row, answer_field)
    if _is_missing(answer, csv_cells):
        answer = None
    elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(
            f"{source}: field {answer_field!r} must be a string or a number, got {type(answer).__name__} "
            f"({_short(answer)}); write the reference answer as a string."
        )
    elif not isinstance(answer, str):
        answer = str(answer)  # numeric answers ("answer": 19) are common and unambiguous
    return PromptRecord(text=text, messages=messages, answer=answer, source=source, raw=row)


def check_messages(
    value: Any, source: str, name: str, *, csv_cells: bool = False, ends_with_reply: bool = False
) -> list[dict[str, Any]]:
    """`value` as a list of ``{role, content}`` messages (copies), or a DataError naming `source` and the
    field `name`. A prompt (the default) must not end with an assistant message; `ends_with_reply`: an SFT
    conversation, whose last message must be the assistant's reply (the target), after a prompt.
    `csv_cells`: `value` may be the JSON spelling of the list, as a CSV cell holds it.
    """
    if csv_cells and isinstance(value, str):
        # A CSV cell cannot hold a list; accept the JSON spelling of one.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{source}: field {name!r} must be a JSON list of {{role, content}} objects in a CSV cell "
                f"({e.msg}); fix the cell or use a JSONL file."
            ) from e
    hint = 'write it as [{"role": "user", "content": "..."}'
    hint += ', {"role": "assistant", "content": "..."}]' if ends_with_reply else "]"
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{source}: field {name!r} must be a non-empty list of {{role, content}} messages, got "
            f"{type(value).__name__} ({_short(value)}); {hint}."
        )
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(
                f"{source}: field {name!r}, message {i} must be an object with 'role' and 'content', got "
                f"{_short(msg)}; {hint}."
            )
        if not isinstance(msg["role"], str) or not isinstance(msg["content"], str):
            raise DataError(
                f"{source}: field {name!r}, message {i}: 'role' and 'content' must be strings, got "
                f"role={_short(msg['role'])}, content={_short(msg['content'])}; {hint}."
            )
        out.append(dict(msg))
    if ends_with_reply:
        if out[-1]["role"] != "assistant":
            raise DataError(
                f"{source}: the last message must be the assistant's response (the SFT target), got role "
                f"{out[-1]['role']!r}."
            )
        if len(out) < 2:
            raise DataError(f"{source}: a conversation needs a prompt before the assistant's response.")
    elif out[-1]["role"] == "assistant":
        # A conversation that already ends with the answer is SFT data; rolling out after it would
        # train on a continuation of a finished reply.
        raise DataError(
            f"{source}: field {name!r} ends with an assistant message; prompts must end with a user turn. "
            "Drop the assistant reply (SFT data is not a prompt set)."
        )
    return out


def _short(value: Any, limit: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Templates


def uses_chat(template: str) -> bool:
    """Whether `template` renders through the tokenizer's chat template (which then owns BOS)."""
    return template == "chat" or template.startswith("chat:")


def _resolve_format(spec: str) -> str | None:
    """The format string a non-chat template spec names; None for ``raw``."""
    if spec == "raw":
        return None
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{prompt}" in spec:
        return spec
    names = ", ".join(["raw", "chat", *TEMPLATES, "chat:<name>"])
    raise ConfigError(
        f"unknown prompt template {spec!r}: use one of {names}, or a format string containing {{prompt}}."
    )


def _fill(fmt: str | None, text: str) -> str:
    # str.replace, not str.format: templates contain literal braces (\boxed{}, LaTeX).
    return text if fmt is None else fmt.replace("{prompt}", text)


def _format_of(template: str) -> str | None:
    """The format string of a template spec (the part after ``chat:``, or the whole of a non-chat one);
    None for ``chat`` and ``raw``, which leave the text as it is."""
    if template == "chat":
        return None
    return _resolve_format(template[len("chat:") :] if template.startswith("chat:") else template)


def validate_template(template: str) -> None:
    """Raise ConfigError for a template spec that `render_prompt` would reject, before any data is read."""
    _format_of(template)


def fill_template(template: str, text: str) -> str:
    """`text` with the format part of `template` filled in: the whole prompt for a non-chat template,
    the user message's text for ``chat:<x>``; ``chat`` and ``raw`` leave it as it is."""
    return _fill(_format_of(template), text)


def prompt_messages(
    record: PromptRecord,
    *,
    template: str,
    system_prompt: str | None = None,
    options: Mapping[str, str] = TRAIN_OPTIONS,
) -> list[dict[str, Any]]:
    """The chat messages `render_prompt` hands the tokenizer's chat template for `record` (a chat
    `template`): the record's messages, or its text as one user message, with the last user message
    filled in by ``chat:<x>``, and `system_prompt` first unless the record brings its own system message.
    """
    return _chat_messages(record, template, system_prompt, options)[0]


def _chat_messages(
    record: PromptRecord, template: str, system_prompt: str | None, options: Mapping[str, str]
) -> tuple[list[dict[str, Any]], bool]:
    """`prompt_messages` and whether `system_prompt` was added as its first message."""
    fmt = _format_of(template)
    if record.messages is not None:
        messages = [dict(m) for m in record.messages]
        if fmt is not None:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise DataError(
                    f"{record.source}: template {template!r} fills the last user message, but the record "
                    f"has none; add a user message or use {_set_to(options, 'template', 'chat')}."
                )
            messages[users[-1]]["content"] = _fill(fmt, messages[users[-1]]["content"])
    else:
        messages = [{"role": "user", "content": _fill(fmt, record.text or "")}]
    added_system = bool(system_prompt) and messages[0]["role"] != "system"
    if added_system:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages, added_system


def render_prompt(
    record: PromptRecord,
    tokenizer: Any,
    *,
    template: str = "chat",
    chat_template_kwargs: dict[str, Any] | None = None,
    system_prompt: str | None = None,
    options: Mapping[str, str] = TRAIN_OPTIONS,
) -> str:
    """The exact prompt string a model is given for `record` (see the module docstring for `template`).

    `system_prompt` is added (chat templates only) to records that do not bring their own system message;
    a record's own system message wins, since the data author chose it for that record. `options`: how
    the calling command spells the settings the errors name (`option_names`).
    """
    fmt = _format_of(template)  # an unknown template is refused first, whatever else is wrong
    if not uses_chat(template):
        if system_prompt:
            raise ConfigError(
                f"{options['system_prompt']} needs a chat template, but {options['template']} is {template!r}; "
                f"use {_set_to(options, 'template', 'chat')} (or chat:<name>), or put the instruction into a "
                "format string."
            )
        if record.messages is not None:
            raise DataError(
                f"{record.source}: record has messages, which template {template!r} cannot render; "
                f"use {_set_to(options, 'template', 'chat')} (or chat:<name>)."
            )
        return _fill(fmt, record.text or "")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"template {template!r} needs a chat template, but the tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '?')}) has none (common for base models); use "
            f"{_set_to(options, 'template', 'raw')}, a named template such as dapo, or a format string with "
            "{prompt}."
        )
    messages, added_system = _chat_messages(record, template, system_prompt, options)
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
        )
    except Exception as e:  # Jinja raises TemplateError / TypeError / ValueError from user templates
        raise DataError(
            f"{record.source}: the tokenizer's chat template failed on this record ({type(e).__name__}: {e}); "
            f"check the record's roles and {options['chat_template_kwargs']}."
        ) from e
    check_rendered(messages, text, record.source, added_system=added_system, options=options)
    return text


def _squash(text: str) -> str:
    return " ".join(text.split())


def check_rendered(
    messages: Sequence[dict[str, Any]],
    rendered: str,
    source: str,
    *,
    added_system: bool = False,
    options: Mapping[str, str] = TRAIN_OPTIONS,
) -> None:
    """Refuse a rendered chat prompt that lost the text of one of its prompt messages.

    Jinja chat templates skip messages whose role they do not know (Qwen's drops a ``human`` or
    ``question`` turn without a word), so a record can render to a prompt without its question and the
    run trains on nothing. Every non-assistant message's text, whitespace-normalised (templates
    ``trim``), must appear in the rendered prompt. Assistant turns are exempt: templates legitimately
    rewrite earlier replies (Qwen3 strips their thinking). `added_system`: ``messages[0]`` is
    the system prompt setting, not one of the record's messages (they are numbered from 0 as in the file).
    `options`: how the calling command spells the settings the error names (`option_names`).
    """
    flat = _squash(rendered)
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if msg.get("role") == "assistant" or not isinstance(content, str) or not content.strip():
            continue
        if _squash(content) not in flat:
            what = options["system_prompt"] if added_system and i == 0 else f"message {i - int(added_system)}"
            raise DataError(
                f"{source}: the chat template dropped {what} (role {msg.get('role')!r}): its text is not in "
                "the rendered prompt, so the model would never see it; use a role the template knows "
                f"('user', 'system'), or another {options['template']}."
            )


# --------------------------------------------------------------------------------------------------
# Tokenisation and batching


def encode_prompts(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_prompt_tokens: int,
    sources: Sequence[str],
    add_special_tokens: bool,
    options: Mapping[str, str] = TRAIN_OPTIONS,
) -> list[list[int]]:
    """Token ids of rendered prompts, refusing any prompt over the limit.

    Refusing instead of truncating: a left-truncated prompt loses its question and a right-truncated one
    its generation prompt, both silently. Pass `add_special_tokens=not uses_chat(template)`: chat
    templates already contain BOS and a second one shifts the teacher's view of the prompt. `options`:
    how the calling command spells the limit's setting (`option_names`).
    """
    if len(texts) != len(sources):
        raise ValueError(f"encode_prompts: {len(texts)} texts but {len(sources)} sources")
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    for seq, source in zip(ids, sources, strict=True):
        if len(seq) > max_prompt_tokens:
            limit = options["max_prompt_tokens"]
            shown = f"{limit} {max_prompt_tokens}" if limit.startswith("--") else f"{limit}={max_prompt_tokens}"  # fmt: skip
            raise DataError(
                f"{source}: prompt is {len(seq)} tokens, over {shown}; raise {limit}, or shorten or filter "
                "out this prompt."
            )
        if not seq:
            raise DataError(f"{source}: prompt encodes to zero tokens; remove the record or fill it in.")
    return [list(seq) for seq in ids]


def prepare_prompts(
    records: Sequence[PromptRecord],
    tokenizer: Any,
    *,
    template: str,
    chat_template_kwargs: dict[str, Any] | None = None,
    system_prompt: str | None = None,
    max_prompt_tokens: int = 4096,
    options: Mapping[str, str] = TRAIN_OPTIONS,
) -> tuple[list[str], list[list[int]]]:
    """Rendered prompt texts (`render_prompt`) and their token ids (`encode_prompts`, refusing a prompt
    over `max_prompt_tokens`; chat templates own BOS, so no special tokens then). What every command that
    gives a model prompts uses; `options`: how the calling command spells the settings the errors name
    (`option_names`)."""
    texts = [
        render_prompt(
            r,
            tokenizer,
            template=template,
            chat_template_kwargs=chat_template_kwargs,
            system_prompt=system_prompt,
            options=options,
        )
        for r in records
    ]
    ids = encode_prompts(
        texts,
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        sources=[r.source for r in records],
        add_special_tokens=not uses_chat(template),
        options=options,
    )
    return texts, ids


# --------------------------------------------------------------------------------------------------
# Cursor


class PromptCursor:
    """An endless, deterministic stream of record indices, resumable from a small JSON state.

    Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch) alone, so the order
    never depends on how many prompts were drawn per call or on process history: a run resumed from
    `state_dict()` draws exactly the prompts the uninterrupted run would have.
    """

    def __init__(self, n_records: int, *, seed: int, shuffle: bool = True) -> None:
        if n_records <= 0:
            raise DataError("PromptCursor: no records to draw from; the prompt file is empty.")
        self.n_records = n_records
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_records))
        g = torch.Generator()
        # Mix (seed, epoch) into one 63-bit seed; distinct pairs give distinct permutations in practice.
        g.manual_seed((self.seed * 1_000_003 + epoch * 7_919 + 0x5EED) % (2**63 - 1))
        return torch.randperm(self.n_records, generator=g).tolist()

    def next_indices(self, n: int) -> list[int]:
        """The next `n` record indices, continuing into the next epoch's permutation when one runs out."""
        if n < 0:
            raise ValueError(f"next_indices: n must be >= 0, got {n}")
        out: list[int] = []
        while len(out) < n:
            if self._order is None:
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), self.n_records - self.position)
            out.extend(self._order[self.position : self.position + take])
            self.position += take
            if self.position == self.n_records:
                self.epoch += 1
                self.position = 0
                self._order = None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n_records": self.n_records,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; refuse a state from a different data set, which would silently reorder."""
        n = state.get("n_records", self.n_records)
        if (
            n != self.n_records
            or int(state["seed"]) != self.seed
            or state.get("shuffle", self.shuffle) != self.shuffle
        ):
            raise DataError(
                f"cannot resume the prompt cursor: checkpoint has n_records={n}, seed={state['seed']}, "
                f"shuffle={state.get('shuffle')}, but this run has n_records={self.n_records}, "
                f"seed={self.seed}, shuffle={self.shuffle}; resume with the same prompt file and seed."
            )
        position = int(state["position"])
        if not 0 <= position < self.n_records:
            raise DataError(f"cannot resume the prompt cursor: position {position} out of range")
        self.epoch = int(state["epoch"])
        self.position = position
        self._order = None
