"""Loading the student and teacher, and the checks that must pass before their scores are comparable.

OPD scores the student's token ids with the teacher, so the two must agree on what every id means
(same vocabulary), the teacher's logits must be cut to that shared vocabulary (padded output layers
differ between sizes of one family), and the EOS/chat-template setup of both must be visible at start-up
(field notes #5, #6, #7).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel

from opd.device import resolve_device
from opd.errors import ConfigError, ModelError, TokenizerMismatchError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

# Words in hub/network failures; anything else (a broken config, a bad GGUF) is re-raised as is.
_OFFLINE_MARKERS = (
    "connect",
    "offline",
    "resolve",
    "not a valid model identifier",
    "does not appear to have",
    "repository not found",
    "couldn't find",
    "404",
    "name or service not known",
)


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """The torch dtype for a config string; unknown names fail here rather than inside transformers."""
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


MODEL_SCHEMES = "opd.model_schemes"


def model_scheme(scheme: str) -> Callable[[str], Path]:
    """The resolver of ``SCHEME:NAME`` model specs, from the ``opd.model_schemes`` entry-point group.

    An entry point rather than an import: opd's lab registers ``lab`` this way, so loading a model never
    imports the lab (and other packages can add schemes of their own). `opd.runtime.entry_points` adds
    opd's own when no installed opd declares them (a source tree on PYTHONPATH)."""
    from opd.runtime import entry_points

    found = {ep.name: ep for ep in entry_points(MODEL_SCHEMES)}
    if scheme not in found:
        known = ", ".join(f"{n}:NAME" for n in sorted(found)) or "none"
        raise ModelError(
            f"no resolver for {scheme}:... model specs; known: {known} (a package adds a scheme with an "
            f"{MODEL_SCHEMES!r} entry point)"
        )
    return found[scheme].load()


MODEL_DEFAULTS = "opd.model_defaults"
# What a model may bring defaults for: how its answers are graded and how its prompts are rendered.
DEFAULTABLE = ("verifier", "template")


def _scheme_of(spec: str) -> tuple[str, str] | None:
    """(scheme, name) of a ``SCHEME:NAME`` spec (the rule `_classify` follows), None for other specs."""
    scheme, sep, name = str(spec).partition(":")
    if sep and len(scheme) > 1 and scheme.isidentifier() and not Path(spec).exists():
        return scheme, name.strip()
    return None


def model_defaults(spec: str) -> dict[str, str]:
    """The settings a model spec brings when the user sets none (``lab:student``: the lab's verifier and
    ``raw`` template), from the ``opd.model_defaults`` entry point of its scheme; {} for plain paths, hub
    ids and schemes that register none. An entry point, like `model_scheme`, so the core never imports
    the lab; the callable takes NAME and returns a mapping with keys from `DEFAULTABLE`."""
    from opd.runtime import entry_points

    parsed = _scheme_of(spec)
    if parsed is None:
        return {}
    found = {ep.name: ep for ep in entry_points(MODEL_DEFAULTS)}
    if parsed[0] not in found:
        return {}
    out = found[parsed[0]].load()(parsed[1]) or {}
    bad = sorted(set(out) - set(DEFAULTABLE))
    if bad:
        raise ModelError(f"{spec}: the {parsed[0]} scheme's defaults name {bad}; allowed: {DEFAULTABLE}")
    return {k: str(v) for k, v in out.items()}


def shared_model_defaults(specs: Any) -> tuple[dict[str, str], list[str]]:
    """The defaults every spec in `specs` agrees on, and the specs they came from.

    One command grades and renders for all its models at once (eval's models, doctor's student and
    teachers), so a default is taken only when every model brings the same value: with a lab model beside
    a hub model, neither the lab's verifier nor `math` is right for both, and the user must choose."""
    specs = [s for s in specs if s]
    found = [model_defaults(s) for s in specs]
    if not specs or not all(found):
        return {}, []
    agreed = {k: v for k, v in found[0].items() if all(d.get(k) == v for d in found[1:])}
    return {k: agreed[k] for k in DEFAULTABLE if k in agreed}, specs


def _user_set(cfg: Any, path: str) -> bool:
    """Whether the dotted field `path` of pydantic config `cfg` was given (YAML, option or argument),
    as opposed to left at its default: pydantic's ``model_fields_set``, section by section."""
    node = cfg
    for part in path.split("."):
        if part not in getattr(node, "model_fields_set", set()):
            return False
        node = getattr(node, part)
    return True


def model_defaults_note(specs: list[str], taken: dict[str, str], options: dict[str, str]) -> str:
    """The one line saying which settings were taken from the models, and how to override them."""
    specs = list(dict.fromkeys(specs))
    who = specs[0] + (f" (and {len(specs) - 1} more)" if len(specs) > 1 else "")
    schemes = ", ".join(dict.fromkeys(f"{p[0]}:" for p in map(_scheme_of, specs) if p))
    what = " and ".join(f"{k} {v}" for k, v in taken.items())
    how = " / ".join(options[k] for k in taken)
    return f"{who}: using {what} (the defaults of {schemes} models; set {how} to override)"


def apply_model_defaults(
    cfg: Any, specs: Any, fields: dict[str, str], say: Callable[[str], Any] | None = None
) -> Any:
    """`cfg` (a copy) with the defaults the models in `specs` bring applied to the fields the user left
    unset; `fields` maps a key of `DEFAULTABLE` to its dotted field path in `cfg` (``"template":
    "data.template"``; a list field such as doctor's ``templates`` gets a one-item list). Explicit
    settings always win. `say` gets one line naming what was taken (nothing when nothing was)."""
    defaults, sources = shared_model_defaults(specs)
    todo = {k: defaults[k] for k in fields if k in defaults and not _user_set(cfg, fields[k])}
    if not todo:
        return cfg
    cfg = cfg.model_copy(deep=True)
    for key, value in todo.items():
        *parents, leaf = fields[key].split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, [value] if isinstance(getattr(node, leaf), list) else value)
    if say is not None:
        options = {k: "--" + (p if "." in p else k) for k, p in fields.items()}
        say(model_defaults_note(sources, todo, options))
    return cfg


def _classify(spec: str) -> tuple[str, Path | None]:
    """('dir' | 'gguf' | 'hub', path) for a model spec; local-looking specs that do not exist fail here.

    ``SCHEME:NAME`` resolves through the `model_scheme` registered for SCHEME (``lab:student`` is a model
    of the lab zoo shipped with opd) to a directory, so such models go through exactly the loader real
    checkpoints use.
    """
    scheme, sep, name = spec.partition(":")
    if sep and len(scheme) > 1 and scheme.isidentifier() and not Path(spec).exists():
        return "dir", model_scheme(scheme)(name.strip())
    p = Path(spec).expanduser()
    if p.is_dir():
        return "dir", p
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}; check the path.")
        return "gguf", p
    if p.exists():
        raise ModelError(f"{p} is a file but not a .gguf; pass a model directory or a .gguf file.")
    why = _local_looking(spec)
    if why is not None:
        raise ModelError(
            f"model path not found: {p}{why}; pass an existing directory, a .gguf file or a hub id."
        )
    return "hub", None


# Endings of files a model spec may name by mistake (a weight or config file, a prompt file); hub repo
# ids do not end in them, so such a spec that is not on disk is a mistyped local path.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".json", ".jsonl",
                  ".yaml", ".yml", ".txt", ".model", ".tiktoken")  # fmt: skip


def _local_looking(spec: str) -> str | None:
    """Why a spec that is not on disk is still a local path and not a hub id ("" when its form says
    so, a note when only this directory's contents do), or None for a hub-id-like spec (``org/name``).

    Deciding here, without the network, saves the hub's retries (tens of seconds offline) for a path
    that was only mistyped: ``runs/sft`` where ``runs/`` exists, ``final/model.safetensors``."""
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
        return ""
    if spec.lower().endswith(_FILE_SUFFIXES):
        return ""
    first, sep, _ = spec.partition("/")
    if not (sep and Path(first).is_dir()):
        return None
    try:
        there = sorted(c.name for c in Path(first).iterdir() if not c.name.startswith("."))
        more = f" and {len(there) - 5} more" if len(there) > 5 else ""
        held = f"; it holds {', '.join(there[:5]) or 'nothing'}{more}"
    except OSError:  # unreadable: its name alone makes the point
        held = ""
    return f" ({first}/ is a directory here, so {spec!r} is read as a path in it, not a hub id{held})"


# ----------------------------------------------------------------------------------------------------
# Damaged and unsafe files: checked where they are opened, so the user gets one line naming the file
# and what to do, not a traceback from gguf/safetensors/torch deep inside transformers.

_REDOWNLOAD = "re-download it (compare its size or sha256 with the source)"
_JSON_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")  # fmt: skip
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# What transformers builds a tokenizer from (fast, SentencePiece, BPE and WordPiece vocabularies); a
# directory with none of them has no tokenizer, whatever else it holds.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "special_tokens_map.json")  # fmt: skip


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file that is not one or is cut short, before transformers parses it.

    gguf's reader maps the file and views every tensor's bytes; a truncated download fails there with
    ``cannot reshape array of size ... into shape ...``. The same reader run here turns any failure into
    one line naming the file. It only maps the file (no copy), so this costs a header parse.
    """
    import gguf

    size = path.stat().st_size
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(
            f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'; {size:,} bytes); "
            f"pass the .gguf itself, or {_REDOWNLOAD}."
        )
    try:
        reader = gguf.GGUFReader(str(path))
        need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # numpy reshape/index errors, ValueError from the header, ...
        raise ModelError(
            f"{path}: damaged or truncated GGUF file ({size:,} bytes; the reader fails with "
            f"{type(e).__name__}: {_first_line(e)}); {_REDOWNLOAD}."
        ) from e
    if need > size:
        raise ModelError(
            f"{path}: truncated GGUF file ({size:,} bytes, its tensors need {need:,}); {_REDOWNLOAD}."
        )


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header is unreadable or whose tensors run past its end.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's byte range,
    then the data; reading the header (not the weights) finds a truncated or corrupt download.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ModelError(
                f"{path}: damaged or truncated safetensors file ({size:,} bytes, "
                + ("too short for a header" if n < 0 else f"its header claims {n:,} bytes")
                + f"); {_REDOWNLOAD}."
            )
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError,
                IndexError) as e:  # fmt: skip
            raise ModelError(
                f"{path}: damaged safetensors file (its header is not valid: {type(e).__name__}); {_REDOWNLOAD}."
            ) from e
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise ModelError(
            f"{path}: truncated safetensors file ({size:,} bytes, its header needs {need:,}); {_REDOWNLOAD}."
        )


def check_torch_bin(path: Path) -> None:
    """Refuse a ``.bin`` checkpoint that is cut short (its zip directory is missing).

    Only the container is checked here; what the pickle inside holds is judged by torch's
    ``weights_only=True`` loader during the load, and `_model_load_error` words its refusal.
    """
    with path.open("rb") as fh:
        start = fh.read(2)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                if not any(n.endswith("data.pkl") for n in zf.namelist()):
                    raise ModelError(
                        f"{path}: not a PyTorch checkpoint (a zip without data.pkl); {_REDOWNLOAD}, "
                        "or use the model's safetensors weights."
                    )
        except zipfile.BadZipFile as e:
            raise ModelError(f"{path}: damaged PyTorch checkpoint ({_first_line(e)}); {_REDOWNLOAD}.") from e
    elif not start.startswith(b"\x80"):  # neither torch's zip format nor its legacy raw pickle
        raise ModelError(
            f"{path}: damaged or truncated PyTorch checkpoint (not a zip archive, {path.stat().st_size:,} "
            f"bytes); {_REDOWNLOAD}, or use the model's safetensors weights."
        )


def _check_json(path: Path) -> None:
    from opd.errors import read_utf8

    try:
        json.loads(read_utf8(path, ModelError, "model file"))
    except json.JSONDecodeError as e:
        raise ModelError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); the file is damaged or "
            f"truncated: {_REDOWNLOAD}."
        ) from e


def _shards(directory: Path, index_name: str) -> list[Path]:
    index = directory / index_name
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8-sig"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ModelError(f"{index}: damaged shard index ({type(e).__name__}); {_REDOWNLOAD}.") from e
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(
            f"{directory / missing[0]}: weight shard listed in {index.name} is missing{more}; "
            "download every shard of the model."
        )
    return [directory / n for n in names]


def check_model_dir(directory: Path, *, weights: bool = True, tokenizer: bool = False) -> None:
    """Check the files a model directory is loaded from: config, JSON side files and weight files.

    `weights`: the files transformers would load (safetensors first, like transformers, else ``.bin``);
    `tokenizer`: that some tokenizer file is there, and its JSON files (config.json too: transformers
    reads it to pick the tokenizer class). Missing optional files are not errors here.
    """
    if not any(directory.iterdir()):
        raise ModelError(
            f"{directory}: empty directory, not a model (a download or save that never finished?); pass the "
            "directory that holds config.json, the weights and the tokenizer files."
        )
    if weights and not (directory / "config.json").is_file():
        raise ModelError(
            f"{directory}: no config.json, so this is not a Hugging Face model directory; pass the directory "
            "that holds config.json and the weights (or a .gguf file)."
        )
    if tokenizer and not any(
        f.name in _TOKENIZER_FILES or f.suffix == ".tiktoken" for f in directory.iterdir() if f.is_file()
    ):
        raise ModelError(
            f"{directory}: no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); the model was saved "
            "without its tokenizer: save it there too (`tokenizer.save_pretrained(DIR)`) or copy those files "
            "from the model it came from."
        )
    names = (_JSON_FILES if weights else ()) + (("config.json", *_TOKENIZER_JSON) if tokenizer else ())
    for name in dict.fromkeys(names):
        if (directory / name).is_file():
            _check_json(directory / name)
    if not weights:
        return
    safetensors = _shards(directory, "model.safetensors.index.json") or [
        p for p in [directory / "model.safetensors"] if p.is_file()
    ]
    if safetensors:
        for p in safetensors:
            check_safetensors(p)
        return
    bins = _shards(directory, "pytorch_model.bin.index.json") or [
        p for p in [directory / "pytorch_model.bin"] if p.is_file()
    ]
    for p in bins:
        check_torch_bin(p)
    weight_like = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
    if (
        not bins
        and not (directory / "adapter_config.json").is_file()
        and not any(f.suffix in weight_like for f in directory.iterdir())
    ):
        raise ModelError(
            f"{directory}: has config.json but no weights (model.safetensors or pytorch_model.bin); the "
            "download is incomplete or the model was saved without weights: download the weight files too."
        )


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (transformers' config errors span two)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_error(err: BaseException, model_dir: Path | None) -> ModelError | None:
    """One line for an OS error reading a model's files (one this user may not read, a broken link into
    the hub cache), naming the file, or None when `err` is not one."""
    if not isinstance(err, OSError) or not err.filename or err.errno is None:
        return None
    name = errno.errorcode.get(err.errno, str(err.errno))
    what = f"{(err.strerror or name).lower()}: {err.filename} (reading, {name})"
    if isinstance(err, PermissionError):
        owner = model_dir if model_dir is not None else Path(str(err.filename)).parent
        return ModelError(
            f"{what}; opd must read every file of the model: have its owner make them readable "
            f"(`chmod -R a+rX {owner}`), or run opd as a user who can read them."
        )
    return ModelError(f"{what}; check the file and its disk, or {_REDOWNLOAD}.")


def _is_config_error(err: BaseException) -> bool:
    """Whether `err` is transformers refusing a config's values (huggingface_hub's strict dataclasses,
    which transformers 5 configs are: a wrong type, heads that do not divide the hidden size, ...)."""
    return type(err).__module__.startswith("huggingface_hub") and "ValidationError" in type(err).__name__


def _config_error(model_dir: Path, err: BaseException, trust_remote_code: bool) -> ModelError:
    """One line for a config.json transformers cannot build a config from: no or an unknown
    ``model_type``, or values it refuses; the JSON itself was checked by `check_model_dir`."""
    import transformers

    cfg_file = model_dir / "config.json"
    version = f"transformers {transformers.__version__}"
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):  # gone or rewritten since it was checked: say what transformers said
        data = {}
    if not isinstance(data, dict):
        return ModelError(
            f"{cfg_file}: not a JSON object of settings ({type(data).__name__}); {_REDOWNLOAD}."
        )
    model_type = data.get("model_type")
    if not model_type:
        return ModelError(
            f'{cfg_file}: no "model_type", so {version} cannot tell which architecture the model is; add '
            f'it as in the model\'s original config.json (e.g. "model_type": "llama"), or {_REDOWNLOAD}.'
        )
    if model_type not in transformers.CONFIG_MAPPING:
        code = (
            "; config.json names the model's own code (auto_map): set trust_remote_code if you trust its source"
            if "auto_map" in data
            else " (config.json has no auto_map, so the model ships no code of its own for trust_remote_code)"
        )
        return ModelError(
            f"{cfg_file}: model_type {model_type!r} is unknown to {version}; upgrade transformers "
            f"(`pip install -U transformers`) if the model is newer than it{'' if trust_remote_code else code}."
        )
    return ModelError(
        f"{cfg_file}: {version} refuses this config ({_one_line(err)}); fix that value (compare with the "
        f"model's original config.json), or {_REDOWNLOAD}."
    )


def _model_load_error(
    spec: str, kind: str, path: Path | None, err: Exception, *, trust_remote_code: bool = False
) -> ModelError | None:
    """One line for a known failure of transformers' loader on a local model; None for anything else.

    Never suggests ``weights_only=False``: a pickle that safe loading refuses can run code when loaded,
    so the way out is a safetensors copy, made where the source is trusted.
    """
    where = str(path) if path is not None else spec
    if path is not None and path.is_dir():
        bins = sorted(path.glob("pytorch_model*.bin"))
        where = str(bins[0]) if len(bins) == 1 else where
    for e in _causes(err):
        if (read := _read_error(e, path if kind == "dir" else None)) is not None:
            return read
        if kind == "dir" and path is not None and _is_config_error(e):
            return _config_error(path, e, trust_remote_code)
        if kind == "dir" and isinstance(e, ValueError) and "Unrecognized configuration class" in str(e):
            return ModelError(
                f"{path}: transformers has no causal language model for this config ({_first_line(e, 120)}); "
                "opd distils decoder-only causal LMs: pass one."
            )
        if kind == "dir" and isinstance(e, OSError) and str(e).startswith("Error no file named"):
            adapter = (
                " (a PEFT adapter's directory: pass its base model merged with it)"
                if (path is not None and (path / "adapter_config.json").is_file())
                else ""
            )
            return ModelError(
                f"{path}: transformers finds no model weights here{adapter} ({_first_line(e, 120)}); pass the "
                "directory that holds config.json with model.safetensors or pytorch_model.bin."
            )
        if isinstance(e, pickle.UnpicklingError):
            m = _UNSAFE_GLOBAL.search(str(e))
            what = f"the Python object {m.group(1)}" if m else "Python objects other than tensors"
            return ModelError(
                f"{where}: refused to load: the pickle holds {what}, which opd will not unpickle (loading it "
                "could run code); use the model's safetensors weights, or convert the checkpoint to "
                "safetensors where you trust its source."
            )
        if isinstance(e, (EOFError, zipfile.BadZipFile)) or (
            isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e)
        ):
            return ModelError(
                f"{where}: damaged or truncated PyTorch checkpoint ({_first_line(e)}); {_REDOWNLOAD}."
            )
        if type(e).__name__ == "SafetensorError":
            return ModelError(f"{where}: damaged safetensors file ({_first_line(e)}); {_REDOWNLOAD}.")
    if kind == "gguf" and isinstance(err, (ValueError, KeyError, NotImplementedError, IndexError)):
        return ModelError(
            f"{where}: transformers cannot load this GGUF ({type(err).__name__}: {_first_line(err)}); check that "
            "transformers supports its architecture and quantization, or use a Hugging Face model directory."
        )
    return None


def _check_config(model_dir: Path, trust_remote_code: bool) -> None:
    """Build the directory's config once before the weights are read, so a config.json transformers
    refuses is reported as that file, not as a traceback from inside the model's construction."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except OSError:
        raise  # a file it cannot read: `_read_error`, where the load's errors are worded
    except Exception as e:
        raise _config_error(model_dir, e, trust_remote_code) from e


def _tensors(keys: Any) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _inside(model: PreTrainedModel, key: str) -> bool:
    """Whether checkpoint tensor `key` would live in a module the model has (``model.layers.2....`` of a
    model built with fewer layers), rather than in a part this class has none of (a vision tower read
    by a text-only class, which transformers rightly skips)."""
    modules = dict(model.named_modules())
    parts = key.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _check_load_report(where: str, source: str, info: dict[str, Any], model: PreTrainedModel) -> None:
    """Refuse weights that do not fill the model `source` (its config) describes.

    transformers loads them anyway: a tensor missing from the files, or of another shape (with
    ``ignore_mismatched_sizes``), is initialised at random and only a table is logged, so the model would
    load and score as noise. Tied weights (an LM head tied to the embedding) and non-persistent buffers
    are not in its missing keys. Extra tensors inside the model's own modules mean the config describes
    a smaller model than the weights (fewer layers, no biases) and are refused too; extras of a part the
    class does not have are logged.
    """
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        key, ckpt, want = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise ModelError(
            f"{where}: tensor {key} has shape {list(ckpt)} in the weights but {source} makes it {list(want)}"
            f"{more}, so that config does not describe these weights (another size of the model?); use the "
            "config.json that came with them, or re-download both."
        )
    missing = info.get("missing_keys") or ()
    if missing:
        n = len(missing)
        raise ModelError(
            f"{where}: {n} tensor{'s' if n > 1 else ''} the model needs {'are' if n > 1 else 'is'} not in the "
            f"weights ({_tensors(missing)}); transformers would fill {'them' if n > 1 else 'it'} with random "
            "values. Re-download the weights (an incomplete download?), or, if they are another model's, use "
            f"the config.json that came with them instead of {source}."
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    extra = [k for k in unexpected if _inside(model, k)]
    if extra:
        n = len(extra)
        raise ModelError(
            f"{where}: {n} tensor{'s' if n > 1 else ''} in the weights {'have' if n > 1 else 'has'} no place in "
            f"the model {source} describes ({_tensors(extra)}), so that config is for a smaller or different "
            "model (fewer layers, no biases, ...); use the config.json that came with these weights, or "
            "re-download both."
        )
    if unexpected:
        n = len(unexpected)
        log.warning(f"{where}: {n} tensor{'s' if n > 1 else ''} not used by {type(model).__name__}, which has "
                    f"no such part ({_tensors(unexpected)})")  # fmt: skip


class _LoadReportFilter(logging.Filter):
    """Drops transformers' LOAD REPORT table: `_check_load_report` words its findings in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _opd_words_the_load_report() -> Iterator[None]:
    """While a model loads, transformers' LOAD REPORT table is not logged (`_LoadReportFilter`)."""
    loggers = [
        logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.integrations.peft")
    ]
    drop = _LoadReportFilter()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def model_directory(spec: str, what: str = "this backend") -> Path:
    """The local Hugging Face model directory a spec names (a dir or ``lab:NAME``), for engines (vLLM)
    that load checkpoints themselves and cannot take a GGUF file or an offline hub id; its files are
    checked as `check_model_dir` checks them, since the engine's own errors come late and long."""
    kind, path = _classified(spec)
    if kind == "hub":
        raise ModelError(
            f"model path not found: {spec}; {what} takes a local Hugging Face model directory, not a hub id "
            f"(download it first, e.g. `hf download {spec} --local-dir DIR`, and pass DIR)."
        )
    if kind != "dir" or path is None:
        raise ModelError(
            f"{what} needs a Hugging Face model directory (config.json + safetensors), got {spec!r}; "
            "save it with `model.save_pretrained(DIR)` and pass DIR"
        )
    try:
        check_model_dir(path, weights=True, tokenizer=True)
    except OSError as e:
        raise _read_error(e, path) or e from e
    return path


@functools.lru_cache(maxsize=64)
def _hub_unreachable(spec: str) -> str | None:
    """Why the Hugging Face Hub cannot serve `spec` now (one HEAD of its config.json, no retries), or None
    when it answered, whatever it said (transformers words "no such repository" itself).

    Unreachable, transformers' hub client retries every file for ~25 s before it gives up; told so, the
    load reads the local cache alone and fails (or succeeds from the cache) at once."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        get_hf_file_metadata(hf_hub_url(spec, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except OfflineModeIsEnabled:
        return "offline mode is on: HF_HUB_OFFLINE"
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        return f"it answered HTTP {status}" if status in (408, 500, 502, 503, 504) else None
    except Exception as e:  # the hub client's transport errors (httpx, or its vendored copy)
        if type(e).__module__.startswith(("httpx", "httpcore")) or isinstance(e, (OSError, TimeoutError)):
            return f"{type(e).__name__}: {_first_line(e, 120)}"
        return None  # e.g. a malformed repo id, which transformers explains
    return None


def _hub_error(spec: str, what: str, err: Exception) -> ModelError | None:
    text = f"{type(err).__name__} {err}".lower()
    module = type(err).__module__
    networky = isinstance(err, OSError) or module.startswith(
        ("huggingface_hub", "httpx", "requests", "urllib3")
    )
    if networky and any(m in text for m in _OFFLINE_MARKERS):
        reason = _hub_unreachable(spec)
        if reason is not None:
            return ModelError(
                f"cannot load {what} {spec!r}: it is not a local directory or .gguf file, the Hugging Face Hub "
                f"is unreachable ({reason}) and the local hub cache does not hold it. Pass a local model "
                "directory or a .gguf path (or download it first where the hub is reachable)."
            )
        return ModelError(
            f"cannot load {what} {spec!r}: it is not a local directory or .gguf file, and the Hugging Face Hub "
            f"is unreachable or has no such repository ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Pass a local model directory or a .gguf path (or download it first where the hub is reachable)."
        )
    return None


def _classified(spec: str) -> tuple[str, Path | None]:
    """`_classify`, with a path this user may not look into worded as one line."""
    try:
        return _classify(spec)
    except OSError as e:  # stat of a path under a directory this user may not enter
        raise _read_error(e, None) or e from e


def _hub_options(kind: str, spec: str, *, model: bool) -> dict[str, Any]:
    """from_pretrained options for a hub id: the cache alone when the Hub is unreachable (`_hub_unreachable`).

    A model load is told twice: transformers 5 looks for a PEFT adapter of the repo without passing
    ``local_files_only`` on, and that lookup alone retries for ~25 s."""
    if kind != "hub" or _hub_unreachable(spec) is None:
        return {}
    return {"local_files_only": True, **({"adapter_kwargs": {"local_files_only": True}} if model else {})}


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a directory, a .gguf file or a hub id (hub only when online)."""
    kind, path = _classified(spec)
    hub = _hub_options(kind, spec, model=False)
    try:
        _check_files(kind, path, weights=False, tokenizer=True)
        if kind == "dir":
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if kind == "gguf":
            assert path is not None
            return AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code
            )
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code, **hub)
    except ModelError:
        raise
    except Exception as e:
        if (err := _load_failure(spec, kind, path, "tokenizer", e, trust_remote_code)) is not None:
            raise err from e
        raise


def _load_failure(
    spec: str, kind: str, path: Path | None, what: str, err: Exception, trust_remote_code: bool
) -> ModelError | None:
    """The one line for a failed tokenizer or model (`what`) load; None for an error opd cannot word."""
    if kind == "hub":
        return _hub_error(spec, what, err)
    return _model_load_error(spec, kind, path, err, trust_remote_code=trust_remote_code)


def _check_files(kind: str, path: Path | None, *, weights: bool, tokenizer: bool) -> None:
    """Validate a local model's files before transformers opens them (see `check_model_dir`)."""
    if path is None:
        return
    if kind == "gguf":
        check_gguf(path)
    elif kind == "dir":
        check_model_dir(path, weights=weights, tokenizer=tokenizer)


def _weights_file(path: Path) -> Path:
    """The file a directory's weights are read from, for messages (the directory when sharded)."""
    return next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), path)


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode, freshly loaded on every call.

    No caching on purpose: student and teacher may come from the same file but the student gets trained,
    so they must never share parameters.

    `device`: where the model runs, resolved by `opd.device.resolve_device` (``auto``, ``cpu``,
    ``cuda:N`` or a `torch.device`); the model is moved there once, here, right after loading. None
    leaves it on the CPU for callers that place it themselves (the trainer and SFT, through accelerate).

    Weights that leave part of the model at random (a tensor missing, of another shape, or more layers
    than the config) are refused (`_check_load_report`).
    """
    torch_dtype = resolve_dtype(dtype)
    target = None if device is None else resolve_device(device)  # a bad device fails before the load
    kind, path = _classified(spec)
    # Shapes that differ from the config load at random instead of raising; the load report then refuses
    # them, naming the tensor, where transformers would raise after a table of every mismatch.
    common = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "output_loading_info": True,
              "ignore_mismatched_sizes": True}  # fmt: skip
    try:
        _check_files(kind, path, weights=True, tokenizer=False)
        with _opd_words_the_load_report():
            if kind == "dir":
                assert path is not None
                _check_config(path, trust_remote_code)
                model, info = AutoModelForCausalLM.from_pretrained(str(path), **common)
            elif kind == "gguf":
                assert path is not None
                # dequantize=True: with the `kernels` package installed transformers would otherwise keep the
                # weights packed in GGUF blocks, which cannot be trained or saved as safetensors.
                model, info = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True),
                    **common,
                )  # fmt: skip
                _drop_gguf_quantization(model)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(
                    spec, **common, **_hub_options(kind, spec, model=True)
                )
    except ModelError:
        raise
    except Exception as e:
        if (err := _load_failure(spec, kind, path, "model", e, trust_remote_code)) is not None:
            raise err from e
        raise
    if path is None:
        where, source = spec, f"{spec}'s config.json"
    elif kind == "gguf":
        where, source = str(path), "its GGUF metadata"
    else:
        where, source = str(_weights_file(path)), str(path / "config.json")
    _check_load_report(where, source, info, model)
    model.eval()
    if target is not None:
        model.to(target)
    return model


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """Forget that the weights came from GGUF: they are already de-quantized to plain tensors.

    Depending on the transformers version and path, a GGUF quantizer and `config.quantization_config`
    stay on the model, which makes `save_pretrained` refuse to write (or a saved config claim GGUF
    quantization) and blocks dtype casts; dequantize=True removes most of it, this removes the rest.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "quantization_method"):
        with contextlib.suppress(AttributeError):
            delattr(model, "quantization_method")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def prepare_tokenizer(tok: Any) -> list[str]:
    """Make a tokenizer fit for batched generation; return notes on what was changed, for the start-up print.

    Left padding keeps every prompt's last token at the same position, where generation starts. A
    missing pad token is set to EOS (the usual choice), which means masks must come from lengths,
    never from `ids == pad_id`, or generated EOS tokens get masked out.
    """
    notes: list[str] = []
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(
                f"tokenizer {getattr(tok, 'name_or_path', '?')!r} has neither a pad nor an EOS token; "
                "generation cannot stop or batch. Use a tokenizer that defines eos_token."
            )
        tok.pad_token = tok.eos_token
        notes.append(
            f"tokenizer has no pad token: using EOS {tok.eos_token!r} (id {tok.eos_token_id}) as pad; "
            "masks are built from lengths, so generated EOS tokens still count."
        )
    for note in notes:
        log.warning(note)
    if tok.padding_side != "left":
        side = f"padding_side {tok.padding_side!r} -> 'left' (prompts must end where generation starts)."
        notes.append(side)
        # info, not a warning: most tokenizers are saved right-padded and there is nothing for the user to do
        log.info(side)
        tok.padding_side = "left"
    return notes


def _vocab_diff(a: dict[str, int], b: dict[str, int], limit: int = 5) -> list[str]:
    out = []
    for token in sorted(set(a) | set(b), key=lambda t: (a.get(t, b.get(t, 0)), t)):
        ia, ib = a.get(token), b.get(token)
        if ia != ib:
            out.append(f"{token!r}: student id {ia}, teacher id {ib}")
            if len(out) >= limit:
                break
    return out


def check_tokenizers(student_tok: Any, teacher_tok: Any) -> dict[str, Any]:
    """Compare the two tokenizers; refuse different vocabularies, warn about EOS/BOS/template differences.

    The teacher scores the student's token ids. If an id maps to different strings in the two
    vocabularies, every teacher log-prob is for a token the student never produced, silently
    (TRL #4562). opd has no cross-tokenizer mode, so this is an error, not a warning.
    """
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    report: dict[str, Any] = {
        "student_vocab_size": len(sv),
        "teacher_vocab_size": len(tv),
        "same_vocab": sv == tv,
        "warnings": [],
    }
    if sv != tv:
        diffs = _vocab_diff(sv, tv)
        raise TokenizerMismatchError(
            f"student and teacher tokenizers have different vocabularies (student {len(sv)} tokens, "
            f"teacher {len(tv)}); e.g. " + "; ".join(diffs) + ". The teacher would score the student's ids "
            "as different strings (TRL #4562). Use a teacher from the same tokenizer family as the student; "
            "opd does not support cross-tokenizer distillation."
        )
    warnings: list[str] = report["warnings"]
    for name in ("eos", "bos", "pad"):
        s_id, t_id = getattr(student_tok, f"{name}_token_id"), getattr(teacher_tok, f"{name}_token_id")
        s_tok, t_tok = getattr(student_tok, f"{name}_token"), getattr(teacher_tok, f"{name}_token")
        report[f"student_{name}"] = (s_tok, s_id)
        report[f"teacher_{name}"] = (t_tok, t_id)
        if s_id != t_id and name != "pad":
            warnings.append(
                f"{name.upper()} differs: student {s_tok!r} (id {s_id}), teacher {t_tok!r} (id {t_id}); "
                "the student may never emit the token the teacher expects to end on (runaway length)."
                if name == "eos"
                else f"{name.upper()} differs: student {s_tok!r} (id {s_id}), teacher {t_tok!r} (id {t_id})."
            )
    s_tpl, t_tpl = getattr(student_tok, "chat_template", None), getattr(teacher_tok, "chat_template", None)
    report["student_has_chat_template"] = bool(s_tpl)
    report["teacher_has_chat_template"] = bool(t_tpl)
    report["same_chat_template"] = s_tpl == t_tpl
    if s_tpl != t_tpl:
        which = (
            "only the teacher has one"
            if not s_tpl
            else "only the student has one"
            if not t_tpl
            else "they differ"
        )
        warnings.append(
            f"chat templates: {which}; both models are scored on the prompt rendered with the student's "
            "template. Check the rendered prompt for both models at start-up."
        )
    for w in warnings:
        log.warning(w)
    return report


def _rows(model: PreTrainedModel) -> tuple[int, int]:
    """(output rows, input embedding rows) of a model."""
    out = model.get_output_embeddings()
    n_out = out.weight.shape[0] if out is not None and hasattr(out, "weight") else model.config.vocab_size
    emb = model.get_input_embeddings()
    n_in = emb.weight.shape[0] if emb is not None and hasattr(emb, "weight") else model.config.vocab_size
    return int(n_out), int(n_in)


def shared_vocab_size(student_model: PreTrainedModel, teacher_model: PreTrainedModel, tokenizer: Any) -> int:
    """The number of logit columns both models share: the tokenizer's real vocabulary.

    Checkpoints of one family pad their output layers to different sizes (Qwen2.5: 151936 vs 152064);
    columns past the real vocabulary are never produced by the tokenizer and must be sliced away before
    comparing distributions, or the softmaxes differ in support. Counts the highest id, not just
    `len(tokenizer)`, in case a vocabulary has holes.
    """
    vocab = tokenizer.get_vocab()
    n = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    sizes = {}
    for name, model in (("student", student_model), ("teacher", teacher_model)):
        n_out, n_in = _rows(model)
        sizes[name] = n_out
        if min(n_out, n_in) < n:
            raise ModelError(
                f"the {name} model is too small for the tokenizer: {n_out} output rows and {n_in} embedding "
                f"rows, but the tokenizer has {n} tokens. The {name} was trained with a different "
                "tokenizer; pass the tokenizer that belongs to it."
            )
    log.info(
        "vocabulary: shared %d tokens; student logits %d, teacher logits %d (extra rows are sliced away)",
        n,
        sizes["student"],
        sizes["teacher"],
    )
    return n


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]


def special_tokens_report(tokenizer: Any, model: PreTrainedModel) -> dict[str, Any]:
    """Special tokens as tokenizer, config and generation config see them, for the start-up print.

    Generation stops on `generation_config.eos_token_id`; if the tokenizer's EOS (the one the chat
    template ends turns with) is not among those ids, rollouts run to the length limit.
    """
    gen = getattr(model, "generation_config", None)
    gen_eos = _as_list(getattr(gen, "eos_token_id", None)) if gen is not None else []
    report: dict[str, Any] = {
        name: {"token": getattr(tokenizer, f"{name}_token"), "id": getattr(tokenizer, f"{name}_token_id")}
        for name in ("bos", "eos", "pad")
    }
    report["config_eos_ids"] = _as_list(getattr(model.config, "eos_token_id", None))
    report["generation_eos_ids"] = gen_eos
    report["has_chat_template"] = bool(getattr(tokenizer, "chat_template", None))
    warnings = []
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and gen_eos and eos_id not in gen_eos:
        warnings.append(
            f"tokenizer EOS {tokenizer.eos_token!r} (id {eos_id}) is not a generation stop id {gen_eos}; "
            "rollouts may not stop where the template ends a turn."
        )
    if not gen_eos and eos_id is None:
        warnings.append("no EOS anywhere: generation only stops at the length limit.")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == eos_id:
        warnings.append("pad token is EOS: masks must come from lengths, not from pad ids.")
    report["warnings"] = warnings
    return report


def freeze_teacher(model: PreTrainedModel) -> PreTrainedModel:
    """No gradients and eval mode: the teacher must never hold grads or optimizer state (field notes #10)."""
    model.requires_grad_(False)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------
# A student/teacher pair: the one loader every command that compares two models uses


@dataclass
class PairTokenizers:
    """Both tokenizers, prepared for batched generation and checked to agree on every id."""

    student: Any
    teacher: Any
    report: dict[str, Any]  # check_tokenizers' findings (warnings about EOS/templates)
    notes: list[str]  # what prepare_tokenizer changed, for the start-up print


@dataclass
class Pair:
    """A loaded student/teacher pair; ``teacher`` is None when it scores elsewhere (vLLM, HTTP)."""

    tokenizers: PairTokenizers
    student: PreTrainedModel
    teacher: PreTrainedModel | None
    vocab_size: int  # logit columns both share (padded rows sliced away)


def load_pair_tokenizers(
    student: str, teacher: str | None, *, student_trust_remote_code: bool = False,
    teacher_trust_remote_code: bool = False,
) -> PairTokenizers:  # fmt: skip
    """Load, prepare and compare both tokenizers before any weights are read, so a mismatched pair fails
    in seconds (`TokenizerMismatchError`). Without a teacher path (an HTTP teacher checked against the
    server's tokenizer later) the student's stands in."""
    s_tok = load_tokenizer(student, trust_remote_code=student_trust_remote_code)
    t_tok = load_tokenizer(teacher, trust_remote_code=teacher_trust_remote_code) if teacher else s_tok
    notes = prepare_tokenizer(s_tok) + prepare_tokenizer(t_tok)
    return PairTokenizers(s_tok, t_tok, check_tokenizers(s_tok, t_tok), notes)


def load_pair(
    student: str, teacher: str | None, *, student_dtype: str = "float32", teacher_dtype: str = "float32",
    student_trust_remote_code: bool = False, teacher_trust_remote_code: bool = False,
    device: torch.device | str | None = None, teacher_model: bool = True,
    tokenizers: PairTokenizers | None = None,
) -> Pair:  # fmt: skip
    """Tokenizers (unless already checked: `tokenizers`), then both models, the teacher frozen, and the
    vocabulary they share. ``teacher_model=False`` loads no teacher weights: an engine teacher's ids come
    from the shared tokenizer, so the student alone bounds the columns."""
    toks = tokenizers or load_pair_tokenizers(
        student, teacher, student_trust_remote_code=student_trust_remote_code,
        teacher_trust_remote_code=teacher_trust_remote_code,
    )  # fmt: skip
    s_model = load_model(
        student, dtype=student_dtype, trust_remote_code=student_trust_remote_code, device=device
    )
    t_model = None
    if teacher_model:
        if not teacher:
            raise ConfigError("a teacher model path is needed to load the teacher's weights")
        t_model = freeze_teacher(
            load_model(
                teacher, dtype=teacher_dtype, trust_remote_code=teacher_trust_remote_code, device=device
            )
        )
    return Pair(toks, s_model, t_model, shared_vocab_size(s_model, t_model or s_model, toks.student))
