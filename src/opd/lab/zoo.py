"""The lab zoo: small Llama models trained from scratch on the lab world, shipped with the package.

Why a zoo: OPD's two conditions (compatible thinking patterns; a teacher with capabilities the student
has not seen) can only be tested with models whose training we control. Four models, built one after
another with fixed seeds and fixed STEP counts (wall-time budgets would make the zoo depend on machine
load), by teacher-forced cross-entropy on ``prompt + solution + EOS`` with the prompt masked:

* ``student``: small, pattern A, trained mostly on easy levels and rarely on the gap level
  (`GAP_LEVEL`), so it is partly inside the capability gap (a student with no support on a level gets
  no usable OPD signal: measured while building the zoo), and never on the hardest level.
* ``teacher_novel``: the student's own checkpoint trained further on the hard levels (pattern A): a
  compatible descendant with new capability, like an RL-post-trained model.
* ``teacher_big``: same pipeline and data mix as the student, but 3x the parameters and trained longer:
  higher scores where the student has support (the gap level, seen in 2% of its batches), nothing on
  the level neither has seen. (A first build with the student's step count scored below the student on
  the gap level: undertrained, so "higher scores" did not hold; 1500 steps fixed that.)
* ``teacher_incompatible``: pattern B from scratch on all levels: strong, but the other thinking pattern.

Each model is saved with ``save_pretrained`` (safetensors) plus its tokenizer in
``zoo_files/<name>/``, beside the held-out eval prompt files and a ``MANIFEST.json`` with every file's
sha256, every model's per-level accuracy (greedy and T=1, with format exact-match per pattern), the
student-vs-teacher overlap diagnostics at the gap level, seeds, step counts and build time. Accuracy is
measured with `opd.evaluation.eval.evaluate_prepared` and `LabVerifier`, the same machinery later OPD experiments
use, so the numbers mean the same thing there.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd.data import file_sha256
from opd.errors import ModelError
from opd.lab.world import (
    LEVELS,
    MAX_NEW_TOKENS,
    PATTERNS,
    LabVerifier,
    Problem,
    build_lab_tokenizer,
    eval_problems,
    heldout_prompts,
    pattern_of,
    solution,
    write_prompt_file,
)

__all__ = [
    "DIAG_ROLLOUTS",
    "GAP_LEVEL",
    "MANIFEST",
    "ModelSpec",
    "SPECS",
    "ZOO_DIR",
    "ZOO_NAMES",
    "build_zoo",
    "eval_prompt_path",
    "evaluate_levels",
    "gap_diagnostics",
    "load_manifest",
    "ZOO_MODEL_DEFAULTS",
    "train_model",
    "verify_zoo",
    "zoo_defaults",
    "zoo_path",
]

ZOO_DIR = Path(__file__).resolve().parent / "zoo_files"
MANIFEST = "MANIFEST.json"
ZOO_NAMES: tuple[str, ...] = ("student", "teacher_novel", "teacher_big", "teacher_incompatible")
GAP_LEVEL = 4
"""The level the student is partial on and `teacher_novel` masters: where OPD has something to recover."""
ZOO_MODEL_DEFAULTS: dict[str, str] = {"verifier": "opd.lab.world:LabVerifier", "template": "raw"}
"""How every zoo model is graded and prompted: the lab's answers are bare numbers after a worked sum (no
\\boxed{}), and its prompts are the plain ``a+b+...=`` text. Commands take these for ``lab:`` models
through the ``opd.model_defaults`` entry point (`zoo_defaults`) when the user sets no verifier or template."""
DIAG_ROLLOUTS = 64
DIAG_KS = (4, 16)
IGNORE = -100


@dataclass(frozen=True)
class ModelSpec:
    """How one zoo model is trained: architecture, pattern, level mix, steps, optimiser, seed.

    `mix` maps level -> sampling weight of that level in each batch. `init_from` names an earlier zoo
    model whose weights (and architecture) this one continues from.
    """

    name: str
    pattern: str
    mix: dict[int, float]
    steps: int
    lr: float
    seed: int
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    ffn: int = 256
    batch: int = 128
    warmup: int = 50
    init_from: str | None = None
    note: str = ""


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="student",
            pattern="A",
            mix={2: 0.55, 3: 0.43, 4: 0.02},
            steps=900,
            lr=3e-3,
            seed=1,
            note="pattern A; levels 2-3, level 4 rarely (partial), never level 5",
        ),
        ModelSpec(
            name="teacher_novel",
            pattern="A",
            mix={2: 0.1, 3: 0.1, 4: 0.45, 5: 0.35},
            steps=500,
            lr=1.5e-3,
            seed=2,
            warmup=20,
            init_from="student",
            note="the student's checkpoint trained further on levels 4-5 (new capability, same pattern)",
        ),
        ModelSpec(
            name="teacher_big",
            pattern="A",
            mix={2: 0.55, 3: 0.43, 4: 0.02},
            steps=1500,
            lr=2e-3,
            seed=3,
            hidden=96,
            layers=4,
            heads=4,
            ffn=384,
            note="bigger model (3x the parameters) trained longer on the student's data mix: higher "
            "scores where the student has support, no level the student never saw (no new capability)",
        ),
        ModelSpec(
            name="teacher_incompatible",
            pattern="B",
            mix={2: 0.2, 3: 0.25, 4: 0.3, 5: 0.25},
            steps=1400,
            lr=3e-3,
            seed=4,
            hidden=96,
            layers=3,
            heads=4,
            ffn=384,
            note="pattern B (column sums) from scratch on levels 2-5",
        ),
    )
}


# ----------------------------------------------------------------------------------------------------
# Paths and manifest


def zoo_path(name: str, root: str | Path | None = None) -> Path:
    """Directory of zoo model `name` (shipped zoo unless `root`); ModelError naming the known models."""
    if name not in ZOO_NAMES:
        raise ModelError(f"unknown lab model {name!r}; known: {', '.join(ZOO_NAMES)} (e.g. lab:student)")
    path = Path(root or ZOO_DIR) / name
    if not (path / "config.json").is_file():
        raise ModelError(
            f"lab model {name!r} is not built at {path}; run `opd lab build` (or reinstall opd, which ships it)"
        )
    return path


def zoo_defaults(name: str) -> dict[str, str]:
    """The ``opd.model_defaults`` entry point of the ``lab`` scheme: `ZOO_MODEL_DEFAULTS` for every zoo model
    (``lab:NAME``), so `opd doctor --student lab:student ...` grades with `LabVerifier` unasked."""
    zoo_path(name)  # an unknown name fails here with the list of known ones
    return dict(ZOO_MODEL_DEFAULTS)


def eval_prompt_path(level: int, root: str | Path | None = None) -> Path:
    """The held-out eval prompt file of `level` (JSONL: prompt, answer, level), written by the build."""
    return Path(root or ZOO_DIR) / "eval" / f"level{level}.jsonl"


def load_manifest(root: str | Path | None = None) -> dict[str, Any]:
    """The zoo's MANIFEST.json as a dict (ModelError when the zoo has not been built)."""
    path = Path(root or ZOO_DIR) / MANIFEST
    if not path.is_file():
        raise ModelError(f"no lab zoo manifest at {path}; run `opd lab build`")
    return json.loads(path.read_text(encoding="utf-8"))


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts
    }


def verify_zoo(root: str | Path | None = None) -> list[str]:
    """Problems with the zoo's files against MANIFEST.json checksums; an empty list means intact.

    Reports missing files, changed files and files the manifest does not list, so a half-copied or
    hand-edited zoo is caught before an experiment trusts its recorded accuracies.
    """
    root = Path(root or ZOO_DIR)
    manifest = load_manifest(root)
    recorded: dict[str, str] = manifest.get("files", {})
    actual = _file_hashes(root)
    problems = []
    for rel, digest in recorded.items():
        if rel not in actual:
            problems.append(f"missing: {rel}")
        elif actual[rel] != digest:
            problems.append(f"checksum mismatch: {rel}")
    problems += [f"not in manifest: {rel}" for rel in actual if rel not in recorded]
    return problems


# ----------------------------------------------------------------------------------------------------
# Training


def _new_model(spec: ModelSpec, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model


class _Batcher:
    """Fresh random training problems every step, never a held-out one, encoded char by char.

    Encoding by direct vocabulary lookup is the tokenizer's exact output for this character-level
    vocabulary (a test checks it) and costs nothing next to the forward pass.
    """

    def __init__(self, spec: ModelSpec, tok: PreTrainedTokenizerFast, exclude: set[str]) -> None:
        self.spec = spec
        self.vocab = tok.get_vocab()
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        self.exclude = exclude
        self.rng = random.Random(f"train:{spec.name}:{spec.seed}")
        self.levels = list(spec.mix)
        self.weights = [spec.mix[lv] for lv in self.levels]

    def problem(self) -> Problem:
        level = self.rng.choices(self.levels, self.weights)[0]
        while True:
            p = Problem(numbers=tuple(self.rng.randint(10, 99) for _ in range(level)), level=level)
            if p.prompt not in self.exclude:
                return p

    def encode(self, p: Problem) -> tuple[list[int], list[int]]:
        prompt = [self.bos] + [self.vocab[c] for c in p.prompt]
        response = [self.vocab[c] for c in solution(p, self.spec.pattern)] + [self.eos]  # type: ignore[arg-type]
        return prompt + response, [IGNORE] * len(prompt) + response

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.encode(self.problem()) for _ in range(self.spec.batch)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        return ids, mask, labels


def train_model(
    spec: ModelSpec,
    tok: PreTrainedTokenizerFast,
    *,
    init: LlamaForCausalLM | None = None,
    exclude: set[str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train one zoo model for exactly `spec.steps` AdamW steps; return it (eval mode) and a log.

    Cross-entropy is a mean over response tokens (EOS included) of the batch; prompt tokens are masked,
    because the model should learn to solve, not to generate problems. Linear warm-up then cosine decay
    to 10% of `lr`; grad-norm clip 1.0. `init` continues from an existing model (a copy is trained).
    """
    torch.manual_seed(spec.seed)
    if init is not None:
        model = LlamaForCausalLM(init.config)
        model.load_state_dict(init.state_dict())
        model.generation_config = init.generation_config
    else:
        model = _new_model(spec, tok)
    model.train()
    batcher = _Batcher(spec, tok, heldout_prompts() if exclude is None else exclude)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(spec.steps):
        ids, mask, labels = batcher.next()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    log = {
        "steps": spec.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": round(sum(losses[-20:]) / min(20, len(losses)), 5),
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, log


# ----------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_levels(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerFast,
    *,
    levels: tuple[int, ...] = LEVELS,
    n: int | None = None,
    temperatures: tuple[float, ...] = (0.0, 1.0),
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy per level on the held-out problems: {"greedy"|"t1": {level: {acc, format_A, ...}}}.

    Uses `opd.evaluation.eval.evaluate_prepared` with `LabVerifier` and the lab's response budget, so the numbers
    are the ones `opd eval` and in-loop OPD evaluation report. ``format_A``/``format_B`` are the rates of
    responses equal to that pattern's canonical solution (exact match, arithmetic included);
    ``truncated`` is the rate of responses that never emitted EOS.
    """
    from opd.data import PromptRecord
    from opd.evaluation.eval import evaluate_prepared, prepare_prompts

    verifier = LabVerifier()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for temp in temperatures:
        key = "greedy" if temp == 0.0 else f"t{temp:g}"
        out[key] = {}
        for level in levels:
            problems = eval_problems(level) if n is None else eval_problems(level)[:n]
            records = [
                PromptRecord(
                    text=p.prompt, messages=None, answer=p.answer, source=f"level{level}:{i}", raw={}
                )
                for i, p in enumerate(problems)
            ]
            _, ids = prepare_prompts(records, tok, template="raw")
            res = evaluate_prepared(
                model, tok, records, ids, samples=1, temperature=temp, top_p=1.0,
                max_new_tokens=max_new_tokens, batch_size=len(records), verifier=verifier, seed=seed,
                progress=False,
            )  # fmt: skip
            samples = [(p, s) for p in res.problems for s in p.samples]
            m = len(samples)
            row = {"acc": res.summary["avg@1"], "truncated": res.summary["truncation_rate"]}
            for pat in PATTERNS:
                row[f"format_{pat}"] = sum(pattern_of(s.text or "", p.prompt) == pat for p, s in samples) / m
            out[key][str(level)] = {k: round(float(v), 4) for k, v in row.items()}
    return out


@torch.no_grad()
def gap_diagnostics(
    student: torch.nn.Module,
    teachers: dict[str, torch.nn.Module],
    tok: PreTrainedTokenizerFast,
    *,
    level: int = GAP_LEVEL,
    n: int = DIAG_ROLLOUTS,
    ks: tuple[int, ...] = DIAG_KS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Agreement of each teacher with the student at student-visited states of `level`.

    `n` student rollouts at T=1 on held-out problems of the level, scored by the student and each teacher
    (`opd.generation.scoring.response_logits`), then `opd.diagnostics.token_diagnostics` for every k in `ks`.
    Returns {teacher: {"k4/overlap_ratio": ..., "reverse_kl": ..., ...}}.
    """
    from opd.diagnostics import token_diagnostics
    from opd.generation.rollout import HFGenerator, SamplingParams, tokenizer_vocab_size
    from opd.generation.sampling import stop_ids_for
    from opd.generation.scoring import response_logits

    problems = eval_problems(level)[:n]
    prompt_ids = [tok(p.prompt)["input_ids"] for p in problems]
    gen = HFGenerator(
        student,
        pad_id=tok.pad_token_id,
        stop_ids=stop_ids_for(tok, student),
        vocab_size=tokenizer_vocab_size(tok),
    )
    roll = gen.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens), 1, seed,
                        list(range(len(problems))))  # fmt: skip
    s_logits = response_logits(student, roll)
    vocab = len(tok)
    out: dict[str, dict[str, float]] = {}
    for name, teacher in teachers.items():
        t_logits = response_logits(teacher, roll)
        row: dict[str, float] = {}
        for k in ks:
            d = token_diagnostics(s_logits, t_logits, roll.response_mask, k=k, vocab_size=vocab)
            for key in (
                "overlap_ratio",
                "overlap_mass_student",
                "overlap_mass_teacher",
                "overlap_token_advantage",
            ):
                row[f"k{k}/{key}"] = round(d[key], 4)
            for key in ("reverse_kl", "forward_kl", "entropy_student", "entropy_teacher", "entropy_gap"):
                row[key] = round(d[key], 4)
        out[name] = row
    return out


# ----------------------------------------------------------------------------------------------------
# Build


def _save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path) -> None:
    from transformers.utils import logging as hf_logging

    if path.exists():
        shutil.rmtree(path)
    hf_logging.disable_progress_bar()  # a shard bar per tiny model would break the build's own bars
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    tok.save_pretrained(path)


def _clear_zoo(root: Path) -> None:
    """Remove a previous zoo's models, eval files and manifest, so no stale file survives into the new hashes."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*(root / n for n in ZOO_NAMES), root / "eval", root / MANIFEST]:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()


def _train_all(
    specs: dict[str, ModelSpec], tok: PreTrainedTokenizerFast, root: Path, exclude: set[str], console: Any
) -> tuple[dict[str, LlamaForCausalLM], dict[str, Any]]:
    """Train and save every zoo model in `ZOO_NAMES` order: a model may start from an earlier one
    (`ModelSpec.init_from`), so the order is part of the build, not a detail of the loop."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from opd.progress import Progress  # plain progress lines when stderr is not a terminal

    models: dict[str, LlamaForCausalLM] = {}
    train_logs: dict[str, Any] = {}
    with Progress(
        TextColumn("[bold]{task.fields[name]:<21}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), console=console,
    ) as bar:  # fmt: skip
        for name in ZOO_NAMES:
            spec = specs[name]
            task = bar.add_task("train", total=spec.steps, name=name, loss=float("nan"))

            def on_step(step: int, loss: float, task: Any = task) -> None:
                bar.update(task, completed=step, loss=loss)

            init = models[spec.init_from] if spec.init_from else None
            models[name], train_logs[name] = train_model(
                spec, tok, init=init, exclude=exclude, on_step=on_step
            )
            _save(models[name], tok, root / name)
    return models, train_logs


def _evaluate_all(
    models: dict[str, LlamaForCausalLM], tok: PreTrainedTokenizerFast, eval_n: int | None, max_new_tokens: int,
    console: Any,
) -> dict[str, Any]:  # fmt: skip
    """Per-level accuracy of every trained model, measured the way later experiments measure theirs."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from opd.progress import Progress

    accuracy: dict[str, Any] = {}
    with Progress(
        TextColumn("[bold]eval {task.fields[name]:<21}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    ) as bar:  # fmt: skip
        for name in ZOO_NAMES:
            task = bar.add_task("eval", total=1, name=name)
            accuracy[name] = evaluate_levels(models[name], tok, n=eval_n, max_new_tokens=max_new_tokens)
            bar.update(task, completed=1)
    return accuracy


def _manifest(
    *,
    specs: dict[str, ModelSpec],
    tok: PreTrainedTokenizerFast,
    train_logs: dict[str, Any],
    accuracy: dict[str, Any],
    diagnostics: dict[str, Any],
    eval_n: int | None,
    diag_n: int,
    max_new_tokens: int,
    train_seconds: float,
    t0: float,
) -> dict[str, Any]:
    """The manifest minus file hashes: everything a reader needs to trust the zoo without rebuilding it."""
    return {
        "format": 1,
        "world": {
            "levels": list(LEVELS),
            "gap_level": GAP_LEVEL,
            "eval_problems_per_level": len(eval_problems(LEVELS[0])) if eval_n is None else eval_n,
            "max_new_tokens": max_new_tokens,
            "vocab_size": len(tok),
            "template": ZOO_MODEL_DEFAULTS["template"],
            "verifier": ZOO_MODEL_DEFAULTS["verifier"],
        },
        "models": {
            name: {"spec": asdict(specs[name]), "train": train_logs[name], "accuracy": accuracy[name]}
            for name in ZOO_NAMES
        },
        "gap_diagnostics": {
            "level": GAP_LEVEL,
            "rollouts": diag_n,
            "temperature": 1.0,
            "student": "student",
            "teachers": diagnostics,
        },
        "build": {
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }


def build_zoo(
    out: str | Path | None = None,
    *,
    force: bool = False,
    specs: dict[str, ModelSpec] | None = None,
    eval_n: int | None = None,
    diag_n: int = DIAG_ROLLOUTS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    threads: int | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Train every zoo model in order, evaluate them, and write files + MANIFEST.json into `out`.

    Refuses to overwrite an existing zoo unless `force`. Models are trained one after another (parallel
    runs on 2 cores only halve each other's speed). `threads` sets torch's intra-op threads (default:
    torch's choice). `eval_n`, `diag_n` and `max_new_tokens` exist to make tests fast; a real build keeps
    the defaults (all held-out problems, 64 diagnostic rollouts, the lab's response budget). Returns the
    manifest.
    """
    from rich.console import Console

    if threads:  # 1 is faster than 2 when other jobs share the cores (OpenMP threads spin and collide)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return build_zoo(out, force=force, specs=specs, eval_n=eval_n, diag_n=diag_n,
                             max_new_tokens=max_new_tokens, console=console)  # fmt: skip
        finally:
            torch.set_num_threads(previous)
    console = console or Console(stderr=True)
    root = Path(out or ZOO_DIR)
    specs = specs or SPECS
    if (root / MANIFEST).exists() and not force:
        raise ModelError(f"a lab zoo already exists at {root}; pass --force to rebuild it")
    _clear_zoo(root)
    t0 = time.perf_counter()
    tok = build_lab_tokenizer()
    exclude = heldout_prompts()
    for level in LEVELS:
        write_prompt_file(eval_prompt_path(level, root), eval_problems(level))
    models, train_logs = _train_all(specs, tok, root, exclude, console)
    train_seconds = time.perf_counter() - t0
    accuracy = _evaluate_all(models, tok, eval_n, max_new_tokens, console)
    teachers = {n: models[n] for n in ZOO_NAMES if n != "student"}
    diagnostics = gap_diagnostics(models["student"], teachers, tok, n=diag_n, max_new_tokens=max_new_tokens)
    manifest = _manifest(specs=specs, tok=tok, train_logs=train_logs, accuracy=accuracy, diagnostics=diagnostics,
                         eval_n=eval_n, diag_n=diag_n, max_new_tokens=max_new_tokens, train_seconds=train_seconds,
                         t0=t0)  # fmt: skip
    manifest["files"] = _file_hashes(root)
    manifest["total_bytes"] = sum((root / rel).stat().st_size for rel in manifest["files"])
    from opd.files import json_safe

    (root / MANIFEST).write_text(
        json.dumps(json_safe(manifest), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    return manifest


def accuracy_rows(manifest: dict[str, Any], mode: str = "greedy") -> list[list[str]]:
    """Table rows (model, acc per level, format) of a manifest, for `opd lab build` / `opd lab info`."""
    rows = []
    levels = [str(lv) for lv in manifest["world"]["levels"]]
    for name, entry in manifest["models"].items():
        acc = entry["accuracy"][mode]
        cells = [f"{100 * acc[lv]['acc']:.1f}" for lv in levels]
        pat = entry["spec"]["pattern"]
        fmt = sum(acc[lv][f"format_{pat}"] for lv in levels) / len(levels)
        rows.append([name, pat, *cells, f"{100 * fmt:.1f}"])
    return rows
