"""`opd doctor` and `opd prompts select` score from hidden states, a chunk of rows at a time (issue 13).

Both commands must report exactly what the `[B, T, V]` logits path (`response_logits` + `opd.diagnostics`)
reports on the same rollouts, with no model producing more than one position of logits. The models are
float64 so the comparison is to rounding; the shared vocabulary (the tokenizer's 103 tokens) is smaller
than every head (112 and 128 rows), one head has a bias, one is tied to the input embeddings, and chunks are
forced down to a few rows so every rollout is split across chunks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import opd.generation.row_scoring
import opd.objectives.hidden
from opd.data import PromptRecord
from opd.diagnostics import diagnostic_sums, finalize, merge_sums, sequence_mean_reward, token_diagnostics
from opd.errors import ModelError
from opd.evaluation.eval import auroc
from opd.generation.rollout import Rollout
from opd.generation.row_scoring import Comparison, score_rollout, scoring_head
from opd.generation.scoring import response_logits
from opd.models.tiny import build_tiny_model, build_tiny_tokenizer, tiny_prompts

VOCAB = 103  # len(build_tiny_tokenizer()); the heads below have 112 and 128 rows
CHUNK = 3  # rows per projected chunk: every rollout below spans several chunks
EOS_BIAS = 2.5  # on the student's EOS logit, so some rollouts stop early and masks differ between rows


def _with_bias(model: torch.nn.Module, eos: int, seed: int) -> torch.nn.Module:
    """An untied head with a random bias and a push towards EOS (a ``Linear`` with bias, as some heads are)."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(0.3 * torch.randn(old.out_features, generator=gen, dtype=old.weight.dtype))
        head.bias[eos] += EOS_BIAS
        head.bias[VOCAB:] = -1e4  # padding rows are never sampled, as in trained padded checkpoints
    model.set_output_embeddings(head)
    return model


def _tied(model: torch.nn.Module) -> torch.nn.Module:
    """The head weight is the input embedding matrix itself (tied embeddings)."""
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


def _save_models(out: Path) -> dict[str, Path]:
    """Student (head padded to 112 rows) and two teachers (128 rows), saved plainly; the bias and the tie
    are added after loading (`_adjust`), since a Llama checkpoint keeps neither."""
    tok = build_tiny_tokenizer()
    assert len(tok) == VOCAB
    paths: dict[str, Path] = {}
    for name, kwargs in (
        ("student", {"hidden": 32, "vocab_pad_to": 16, "seed": 0}),
        ("teacher_a", {"hidden": 48, "vocab_pad_to": 64, "seed": 1}),
        ("teacher_b", {"hidden": 40, "vocab_pad_to": 64, "seed": 2}),
    ):
        path = out / name
        build_tiny_model(tok, **kwargs).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    paths["prompts"] = out / "prompts.jsonl"
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in tiny_prompts(8)))
    return paths


def _adjust(name: str, model: torch.nn.Module, eos: int) -> torch.nn.Module:
    model = model.double().eval()
    if name == "student":
        return _with_bias(model, eos, seed=5)
    if name == "teacher_b":
        return _tied(model)
    return model


class _HeadWatch:
    """Records the sequence length of every LM-head output (forward hooks) while ``on``."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.on = True

    def watch(self, model: torch.nn.Module) -> None:
        def hook(_m: torch.nn.Module, _args: Any, out: torch.Tensor) -> None:
            if self.on:
                self.lengths.append(int(out.shape[1]))

        model.get_output_embeddings().register_forward_hook(hook)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Force `CHUNK`-row chunks on the scoring path and record the size of every chunk it projects."""
    real = opd.objectives.hidden.projected_rows
    sizes: list[int] = []

    def projected_rows(heads: list, mask: torch.Tensor, **kw: Any) -> Iterator:
        kw.update(chunk_size=CHUNK, max_chunk_elements=None)
        for b_idx, t_idx, rows in real(heads, mask, **kw):
            sizes.append(int(b_idx.numel()))
            yield b_idx, t_idx, rows

    monkeypatch.setattr(opd.generation.row_scoring, "projected_rows", projected_rows)
    return sizes


def _check_close(got: dict[str, float], ref: dict[str, float], keys: Any = None) -> None:
    keys = list(ref) if keys is None else list(keys)
    assert keys
    for key in keys:
        assert got[key] == pytest.approx(ref[key], rel=1e-10, abs=1e-12), key


# ----------------------------------------------------------------------------------------------------
# score_rollout on its own


def _rollout(lengths: list[int], width: int = 7) -> Rollout:
    """A hand-made rollout with rows of the given response lengths (0: nothing to score)."""
    gen = torch.Generator().manual_seed(0)
    b = len(lengths)
    prompt_ids = torch.randint(4, VOCAB, (b, 3), generator=gen)
    prompt_mask = torch.ones((b, 3), dtype=torch.bool)
    prompt_mask[0, 0] = False  # left padding
    response_ids = torch.randint(4, VOCAB, (b, width), generator=gen)
    response_mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    response_ids[~response_mask] = 0
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(b, dtype=torch.bool))


def _models() -> list[torch.nn.Module]:
    tok = build_tiny_tokenizer()
    return [
        _adjust("student", build_tiny_model(tok, hidden=32, vocab_pad_to=16, seed=0), tok.eos_token_id),
        _adjust("teacher_a", build_tiny_model(tok, hidden=48, vocab_pad_to=64, seed=1), tok.eos_token_id),
        _adjust("teacher_b", build_tiny_model(tok, hidden=40, vocab_pad_to=64, seed=2), tok.eos_token_id),
    ]


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_score_rollout_equals_the_logits_path(chunk_size: int | None) -> None:
    models = _models()
    heads = [scoring_head(m, f"model {i}") for i, m in enumerate(models)]
    roll = _rollout([7, 0, 3, 5])
    comparisons = [Comparison(0, 1, position_bins=3, reward=True), Comparison(0, 2, reward=True),
                   Comparison(1, 2, position_bins=2)]  # fmt: skip
    got = score_rollout(heads, roll, comparisons, k=5, vocab_size=VOCAB, bin_len=7, chunk_size=chunk_size,
                        max_chunk_elements=None)  # fmt: skip
    with torch.no_grad():
        logits = [response_logits(m, roll) for m in models]
    mask, ids = roll.response_mask, roll.response_ids
    for c, g in zip(comparisons, got, strict=True):
        s, t = logits[c.student], logits[c.teacher]
        ref = diagnostic_sums(s, t, mask, k=5, vocab_size=VOCAB, position_bins=c.position_bins, bin_len=7)
        assert set(g.sums) == set(ref)
        _check_close(finalize(g.sums), finalize(ref))
        assert float(g.sums["tokens__count"]) == 15.0
        if c.reward:
            assert g.reward is not None and g.reward.dtype == torch.float64
            want = sequence_mean_reward(s, t, ids, mask, VOCAB)
            torch.testing.assert_close(g.reward, want, rtol=1e-10, atol=1e-12)
            assert float(g.reward[1]) == 0.0  # the row without a token, as sequence_mean_reward
        else:
            assert g.reward is None


def test_score_rollout_without_a_masked_row_gives_every_key() -> None:
    models = _models()[:2]
    heads = [scoring_head(m, f"model {i}") for i, m in enumerate(models)]
    roll = _rollout([0, 0])
    (got,) = score_rollout(heads, roll, [Comparison(0, 1, position_bins=2, reward=True)], k=5,
                           vocab_size=VOCAB, bin_len=7)  # fmt: skip
    blank = torch.zeros((1, 1, 1))
    assert set(got.sums) == set(diagnostic_sums(blank, blank, torch.zeros((1, 1), dtype=torch.bool), k=5,
                                                position_bins=2, bin_len=7))  # fmt: skip
    assert all(float(v) == 0.0 for v in got.sums.values())
    assert got.reward is not None and got.reward.tolist() == [0.0, 0.0]
    assert finalize(got.sums) == {"n_tokens": 0.0}


@pytest.mark.parametrize("head", ["none", "no_weight", "lora_like"])
def test_scoring_head_refuses_a_model_without_a_linear_head(head: str) -> None:
    model = _models()[0]
    if head == "none":
        model.get_output_embeddings = lambda: None  # type: ignore[method-assign]
    elif head == "no_weight":
        model.set_output_embeddings(torch.nn.Identity())
    else:
        model.get_output_embeddings().base_layer = torch.nn.Identity()  # what a peft tuner layer carries
    with pytest.raises(ModelError, match="teacher some/model: .*(linear head|adapter-wrapped)"):
        scoring_head(model, "teacher some/model")


def test_scoring_head_takes_the_tied_embedding_and_the_bias() -> None:
    student, _, teacher_b = _models()
    w, b = scoring_head(teacher_b, "t")[1:]
    assert w.data_ptr() == teacher_b.get_input_embeddings().weight.data_ptr() and b is None
    w, b = scoring_head(student, "s")[1:]
    assert b is not None and tuple(b.shape) == (112,) and tuple(w.shape) == (112, 32)


# ----------------------------------------------------------------------------------------------------
# opd doctor


def _patch_doctor(
    monkeypatch: pytest.MonkeyPatch, paths: dict[str, Path], watch: _HeadWatch
) -> tuple[dict[str, torch.nn.Module], list[Rollout], list[list[float]]]:
    """float64 models with the bias/tie and head hooks; record the student rollouts and AUROC inputs."""
    import opd.evaluation.doctor
    import opd.evaluation.eval
    import opd.models.loading

    eos = build_tiny_tokenizer().eos_token_id
    by_path = {str(p): n for n, p in paths.items()}
    loaded: dict[str, torch.nn.Module] = {}
    real_load = opd.models.loading.load_model

    def load_model(spec: str, **kw: Any) -> torch.nn.Module:
        model = _adjust(by_path[spec], real_load(spec, **kw), eos)
        watch.watch(model)
        loaded[by_path[spec]] = model
        return model

    rolls: list[Rollout] = []
    real_rollouts = opd.evaluation.doctor._rollouts

    def rollouts(model: torch.nn.Module, *args: Any, **kw: Any) -> list[Rollout]:
        out = real_rollouts(model, *args, **kw)
        if model is loaded["student"]:
            rolls.extend(out)
        return out

    scored: list[list[float]] = []
    real_auroc: Callable = opd.evaluation.eval.auroc

    def auroc(scores: list[float], labels: list[bool]) -> float:
        scored.append(list(scores))
        return real_auroc(scores, labels)

    monkeypatch.setattr(opd.models.loading, "load_model", load_model)
    monkeypatch.setattr(opd.evaluation.doctor, "_rollouts", rollouts)
    monkeypatch.setattr(opd.evaluation.eval, "auroc", auroc)
    return loaded, rolls, scored


def test_doctor_equals_the_logits_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: list[int]
) -> None:
    from opd.evaluation.doctor import DoctorConfig, run_doctor

    paths = _save_models(tmp_path)
    watch = _HeadWatch()
    loaded, rolls, scored = _patch_doctor(monkeypatch, paths, watch)
    bins, budget = 3, 8
    cfg = DoctorConfig(
        student=str(paths["student"]), teachers=[str(paths["teacher_a"]), str(paths["teacher_b"])],
        prompts=str(paths["prompts"]), templates=["raw"], n_prompts=3, samples=3, teacher_samples=0,
        max_new_tokens=budget, continuation_rollouts=0, k=5, position_bins=bins, batch_size=2, score_batch=2,
        out=str(tmp_path / "doc"),
    )  # fmt: skip
    res = run_doctor(cfg)
    assert watch.lengths and set(watch.lengths) == {1}  # no model ever produced more than one position
    assert max(small_chunks) == CHUNK and len(small_chunks) > 2 * len(rolls)  # rows really were split
    lengths = torch.cat([r.lengths for r in rolls])
    assert lengths.min() < budget  # some rollouts stopped early: the masks differ between rows

    watch.on = False
    s, ta, tb = loaded["student"], loaded["teacher_a"], loaded["teacher_b"]
    sums: dict[str, dict] = {"teacher_a": {}, "teacher_b": {}}
    pair: dict = {}
    rewards: dict[str, list[float]] = {"teacher_a": [], "teacher_b": []}
    with torch.no_grad():
        for roll in rolls:
            mask = roll.response_mask
            s_l, t_l = response_logits(s, roll), {"teacher_a": response_logits(ta, roll),
                                                  "teacher_b": response_logits(tb, roll)}  # fmt: skip
            for name, t in t_l.items():
                sums[name] = merge_sums(sums[name], diagnostic_sums(
                    s_l, t, mask, k=5, vocab_size=VOCAB, position_bins=bins, bin_len=budget))  # fmt: skip
                rewards[name] += sequence_mean_reward(s_l, t, roll.response_ids, mask, VOCAB).tolist()
            pair = merge_sums(pair, diagnostic_sums(t_l["teacher_a"], t_l["teacher_b"], mask, k=5,
                                                    vocab_size=VOCAB))  # fmt: skip
    correct = [False] * len(rewards["teacher_a"])  # random tiny models never answer an addition
    for i, name in enumerate(("teacher_a", "teacher_b")):
        got = res["teachers"][name]["by_template"]["raw"]
        ref = finalize(sums[name])
        assert "overlap_ratio/bin2" in ref and ref["n_tokens"] == float(lengths.sum())
        _check_close(got, ref)
        assert scored[i] == pytest.approx(rewards[name], rel=1e-10, abs=1e-12)
        want_auroc = auroc(rewards[name], correct)
        assert got["reward_auroc"] == pytest.approx(want_auroc, nan_ok=True)
    got_pair = res["pairs"]["raw"]["teacher_a|teacher_b"]
    assert set(got_pair) == {"overlap_ratio", "reverse_kl", "forward_kl", "overlap_mass_student",
                             "overlap_mass_teacher", "entropy_gap"}  # fmt: skip
    _check_close(got_pair, finalize(pair), got_pair)


def test_doctor_refuses_a_teacher_without_a_linear_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import opd.evaluation.doctor
    import opd.models.loading
    from opd.evaluation.doctor import DoctorConfig, run_doctor

    paths = _save_models(tmp_path)
    real_load = opd.models.loading.load_model

    def load_model(spec: str, **kw: Any) -> torch.nn.Module:
        model = real_load(spec, **kw)
        if spec == str(paths["teacher_b"]):
            model.get_output_embeddings = lambda: None  # type: ignore[method-assign]
        return model

    def no_sampling(*args: Any, **kw: Any) -> None:
        raise AssertionError("the head is checked before any rollout is sampled")

    monkeypatch.setattr(opd.models.loading, "load_model", load_model)
    monkeypatch.setattr(opd.evaluation.doctor, "_rollouts", no_sampling)
    cfg = DoctorConfig(student=str(paths["student"]), teachers=[str(paths["teacher_a"]), str(paths["teacher_b"])],
                       prompts=str(paths["prompts"]), templates=["raw"], n_prompts=1, samples=1)  # fmt: skip
    with pytest.raises(ModelError, match=f"teacher {paths['teacher_b']}: .*linear head"):
        run_doctor(cfg)


# ----------------------------------------------------------------------------------------------------
# opd prompts select


def test_score_records_equals_the_logits_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: list[int]
) -> None:
    import opd.generation.rollout
    from opd.data import load_prompts
    from opd.recipes.prompts import score_records

    paths = _save_models(tmp_path)
    tok = build_tiny_tokenizer()
    student, teacher, _ = _models()
    watch = _HeadWatch()
    watch.watch(student)
    watch.watch(teacher)
    rolls: list[Rollout] = []

    class Recording(opd.generation.rollout.HFGenerator):
        def generate(self, *args: Any, **kw: Any) -> Rollout:
            out = super().generate(*args, **kw)
            rolls.append(out)
            return out

    monkeypatch.setattr(opd.generation.rollout, "HFGenerator", Recording)
    records = load_prompts(paths["prompts"])[:5]
    n, k, budget = 3, 5, 8
    rows = score_records(student, teacher, tok, records, vocab_size=VOCAB, template="raw", rollouts=n,
                         max_new_tokens=budget, k=k, batch_size=2, seed=1)  # fmt: skip
    assert watch.lengths and set(watch.lengths) == {1}
    assert max(small_chunks) == CHUNK and len(small_chunks) > 2 * len(records)
    assert min(int(r.lengths.min()) for r in rolls) < budget

    watch.on = False
    prompts = [(roll, b) for roll in rolls for b in range(len(roll) // n)]
    assert len(prompts) == len(records) == len(rows)
    with torch.no_grad():
        for (roll, b), row in zip(prompts, rows, strict=True):
            sub = roll.select(slice(b * n, (b + 1) * n))
            s_l, t_l = response_logits(student, sub), response_logits(teacher, sub)
            mask = sub.response_mask
            diag = token_diagnostics(s_l, t_l, mask, k=k, vocab_size=VOCAB)
            r_bar = sequence_mean_reward(s_l, t_l, sub.response_ids, mask, vocab_size=VOCAB)
            ref = {
                "response_len": float(sub.lengths.float().mean()),
                "truncated_frac": float(sub.truncated.float().mean()),
                "overlap_ratio": diag["overlap_ratio"],
                "overlap_mass": 0.5 * (diag["overlap_mass_student"] + diag["overlap_mass_teacher"]),
                "overlap_mass_student": diag["overlap_mass_student"],
                "overlap_mass_teacher": diag["overlap_mass_teacher"],
                "entropy_student": diag["entropy_student"],
                "entropy_teacher": diag["entropy_teacher"],
                "reverse_kl": diag["reverse_kl"],
                "neg_reverse_kl": -diag["reverse_kl"],
                "teacher_advantage": float(r_bar[mask.any(1)].mean()),
            }
            assert set(row) == {"prompt_tokens", *ref}
            _check_close(row, ref)


def test_score_records_refuses_a_student_without_a_linear_head(monkeypatch: pytest.MonkeyPatch) -> None:
    import opd.generation.rollout
    from opd.recipes.prompts import score_records

    student, teacher, _ = _models()
    student.get_output_embeddings = lambda: None  # type: ignore[method-assign]

    class NoSampling(opd.generation.rollout.HFGenerator):
        def generate(self, *args: Any, **kw: Any) -> Rollout:
            raise AssertionError("the head is checked before any rollout is sampled")

    monkeypatch.setattr(opd.generation.rollout, "HFGenerator", NoSampling)
    with pytest.raises(ModelError, match="student .*linear head"):
        score_records(student, teacher, build_tiny_tokenizer(), [PromptRecord("1+1=", None, None, "x:1", {})], vocab_size=VOCAB,
                      template="raw")  # fmt: skip
