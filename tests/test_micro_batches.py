"""Micro-batches by token budget (`opd.generation.rollout.plan_step_micro_batches`, ``micro_batch_tokens``).

The planner decides how much memory each forward/backward takes, so these pin down: the default plan is
exactly the old contiguous slicing (no run changes unless it opts in), every row is trained on exactly
once, the budget is met as `Rollout.select` will really trim the rows, sorting by length actually saves
padding, and ``min_groups`` can always equalise the micro-batch count across processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from opd.config import TrainConfig, load_config, parse_overrides
from opd.errors import ConfigError
from opd.generation.rollout import Rollout, plan_step_micro_batches, response_mask_from_ids

sys.path.insert(0, str(Path(__file__).parent))
from fake_cuda import cuda_runtime_stubs, fake_cuda  # noqa: E402

STOP = 2


def _rollout(prompt_lens: list[int], response_lens: list[int], *, P: int | None = None, T: int | None = None,
             engine: bool = False) -> Rollout:  # fmt: skip
    """A chunk with the given real lengths: prompts left-padded to P, responses ending in STOP (unless a
    length fills T: truncated) right-padded to T, as `HFGenerator.generate` lays them out."""
    P = P or max(prompt_lens)
    T = T or max(response_lens)
    B = len(prompt_lens)
    prompts = torch.zeros((B, P), dtype=torch.long)
    response = torch.zeros((B, T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        prompts[i, P - p :] = torch.arange(10, 10 + p)
        response[i, :r] = torch.arange(100, 100 + r)
        if r < T:
            response[i, r - 1] = STOP
    rmask, truncated = response_mask_from_ids(response, [STOP])
    response = torch.where(rmask, response, 0)
    logprobs = torch.where(rmask, -torch.rand(B, T), 0.0) if engine else None
    return Rollout(prompt_ids=prompts, prompt_mask=prompts != 0, response_ids=response, response_mask=rmask,
                   truncated=truncated, prompt_index=[100 + i for i in range(B)],
                   engine_logprobs=logprobs)  # fmt: skip


def _mixed(seed: int = 0, n: int = 24) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 40, (n,), generator=g).tolist()
    # bimodal responses: the case the budget exists for (a few long ones among many short)
    response = [int(x) for x in torch.where(torch.rand(n, generator=g) < 0.3,
                                            torch.randint(150, 256, (n,), generator=g),
                                            torch.randint(2, 30, (n,), generator=g))]  # fmt: skip
    return _rollout(prompt, response, T=256)


def plan_micro_batches(r: Rollout, **caps) -> list[torch.Tensor]:
    """The plan of a step of one chunk."""
    return plan_step_micro_batches([r], **caps)[0]


def _padded(r: Rollout, rows: torch.Tensor | slice) -> int:
    """The cost as measured on what `select` returns, independent of the planner's own arithmetic."""
    mb = r.select(rows)
    return len(mb) * (mb.prompt_ids.shape[1] + mb.response_ids.shape[1])


def _covers(r: Rollout, groups: list[torch.Tensor]) -> None:
    assert all(g.dtype == torch.long and g.dim() == 1 and len(g) > 0 for g in groups)
    rows = torch.cat(groups).tolist() if groups else []
    assert sorted(rows) == list(range(len(r))), "every row exactly once"


def _assert_same_rollout(a: Rollout, b: Rollout) -> None:
    for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.prompt_index == b.prompt_index
    assert (a.engine_logprobs is None) == (b.engine_logprobs is None)
    if a.engine_logprobs is not None:
        assert torch.equal(a.engine_logprobs, b.engine_logprobs)


# ----------------------------------------------------------------------------------------------------
# Rollout.select with indices


@pytest.mark.parametrize("rows", [slice(0, 3), slice(2, 5), slice(4, 5), slice(0, 6), slice(1, 6, 2)])
def test_select_with_indices_equals_the_slice(rows):
    r = _rollout([3, 5, 2, 4, 1, 5], [2, 7, 1, 3, 4, 6], P=6, T=9, engine=True)
    want = r.select(rows)
    idx = list(range(len(r)))[rows]
    _assert_same_rollout(r.select(torch.tensor(idx)), want)
    _assert_same_rollout(r.select(idx), want)
    _assert_same_rollout(r.select(torch.tensor(idx, dtype=torch.int32)), want)


def test_select_with_indices_trims_and_keeps_their_order():
    r = _rollout([1, 6, 2, 3], [2, 9, 3, 1], P=6, T=9)
    mb = r.select(torch.tensor([3, 0, 2]))
    assert mb.prompt_ids.shape[1] == 3 and mb.response_ids.shape[1] == 3  # widest prompt 3, response 3
    assert mb.prompt_index == [103, 100, 102]
    assert torch.equal(mb.response_ids[1], r.response_ids[0, :3])
    assert _padded(r, torch.tensor([3, 0, 2])) == 3 * (3 + 3)


@pytest.mark.parametrize("bad", [torch.tensor([True, False, True, False]), torch.tensor([[0, 1]]),
                                 torch.tensor([0.0, 1.0])])  # fmt: skip
def test_select_refuses_what_is_not_row_indices(bad):
    with pytest.raises(ValueError, match="row indices"):
        _rollout([1, 2, 3, 4], [1, 2, 3, 4]).select(bad)


# ----------------------------------------------------------------------------------------------------
# The default plan


@pytest.mark.parametrize(("n", "mbs"), [(8, 8), (8, 3), (7, 2), (5, 10), (1, 1), (12, 4)])
def test_default_plan_is_the_old_contiguous_slicing(n, mbs):
    r = _mixed(n=n)
    got = plan_micro_batches(r, max_sequences=mbs, max_tokens=None)
    old = [slice(s, s + mbs) for s in range(0, n, mbs)]  # trainer.train_step before micro_batch_tokens
    assert [g.tolist() for g in got] == [list(range(n))[sl] for sl in old]
    for g, sl in zip(got, old, strict=True):
        _assert_same_rollout(r.select(g), r.select(sl))


def test_step_plan_keeps_chunks_apart_and_in_order():
    chunks = [_mixed(1, 6), _mixed(2, 5)]
    plans = plan_step_micro_batches(chunks, max_sequences=4, max_tokens=None)
    assert [[g.tolist() for g in gs] for gs in plans] == [[[0, 1, 2, 3], [4, 5]], [[0, 1, 2, 3], [4]]]
    assert plan_step_micro_batches([], max_sequences=4, max_tokens=None) == []
    empty = _rollout([], [], P=4, T=4)
    for budget in (None, 100):
        assert plan_step_micro_batches([empty], max_sequences=4, max_tokens=budget) == [[]]


# ----------------------------------------------------------------------------------------------------
# Token budget


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("mbs", "budget"), [(8, 600), (4, 1000), (16, 300), (3, 10_000), (8, 50)])
def test_budget_plan_covers_every_row_and_respects_both_caps(seed, mbs, budget):
    r = _mixed(seed)
    groups = plan_micro_batches(r, max_sequences=mbs, max_tokens=budget)
    _covers(r, groups)
    for g in groups:
        assert len(g) <= mbs
        cost = _padded(r, g)
        assert cost <= budget or len(g) == 1, f"{g.tolist()} costs {cost} > {budget}"


def test_a_sequence_over_the_budget_runs_alone_and_is_never_dropped():
    r = _rollout([4, 30, 4, 4], [3, 200, 2, 3], T=200)
    groups = plan_micro_batches(r, max_sequences=8, max_tokens=40)
    _covers(r, groups)
    assert groups[0].tolist() == [1]  # longest first, alone: 230 tokens > 40
    assert sorted(len(g) for g in groups) == [1, 3] and _padded(r, groups[1]) == 3 * (4 + 3) <= 40
    tiny = plan_micro_batches(r, max_sequences=8, max_tokens=1)
    assert [g.tolist() for g in tiny] == [[1], [0], [3], [2]]  # every row over budget: one each


def test_sorting_by_length_saves_padding_over_contiguous_slices():
    r = _mixed(3, 32)
    mbs = 8
    contiguous = sum(_padded(r, g) for g in plan_micro_batches(r, max_sequences=mbs, max_tokens=None))
    worst = max(_padded(r, g) for g in plan_micro_batches(r, max_sequences=mbs, max_tokens=None))
    # a budget as large as the largest contiguous micro-batch: never more memory than before, less padding
    groups = plan_micro_batches(r, max_sequences=mbs, max_tokens=worst)
    packed = sum(_padded(r, g) for g in groups)
    assert packed < 0.8 * contiguous, (packed, contiguous)
    assert max(_padded(r, g) for g in groups) <= worst
    # short rows, once apart from the long ones, fill micro-batches up to micro_batch_size
    assert max(len(g) for g in groups) == mbs


def test_budget_is_measured_on_padded_widths_not_real_tokens():
    """Left-padded prompts: a row with a long prompt and a short response and one with the reverse pad
    each other out in both directions, so two rows of 10 real tokens cost 2 x (8 + 8)."""
    r = _rollout([8, 2], [2, 8], T=8)
    assert _padded(r, torch.tensor([0, 1])) == 32
    assert len(plan_micro_batches(r, max_sequences=2, max_tokens=31)) == 2
    assert len(plan_micro_batches(r, max_sequences=2, max_tokens=32)) == 1


# ----------------------------------------------------------------------------------------------------
# min_groups: the same micro-batch count on every process


@pytest.mark.parametrize("budget", [None, 10_000, 700])
def test_min_groups_splits_until_there_are_enough(budget):
    r = _mixed(4, 12)
    base = plan_micro_batches(r, max_sequences=8, max_tokens=budget)
    for want in range(1, len(r) + 1):
        groups = plan_micro_batches(r, max_sequences=8, max_tokens=budget, min_groups=want)
        _covers(r, groups)
        assert len(groups) == max(want, len(base))
        assert max(_padded(r, g) for g in groups) <= max(_padded(r, g) for g in base)  # never more memory
    with pytest.raises(ValueError, match="min_groups=13"):
        plan_micro_batches(r, max_sequences=8, max_tokens=budget, min_groups=13)


def test_min_groups_halves_the_most_expensive_group():
    r = _rollout([2] * 6, [50, 50, 50, 3, 3, 3], T=50)
    plain = plan_micro_batches(r, max_sequences=3, max_tokens=None)
    assert [g.tolist() for g in plain] == [[0, 1, 2], [3, 4, 5]]
    split = plan_micro_batches(r, max_sequences=3, max_tokens=None, min_groups=3)
    assert [g.tolist() for g in split] == [[0, 1], [2], [3, 4, 5]]


def test_min_groups_across_chunks_equalises_processes():
    """Two processes with the same number of rows but different lengths: the short-response process
    packs into fewer micro-batches and must split up to the other's count (the trainer all-reduces it)."""
    budget = 400
    long_rank = [_rollout([5] * 8, [150, 120, 90, 160, 100, 130, 140, 110], T=160) for _ in range(2)]
    short_rank = [_rollout([5] * 8, [3, 9, 4, 12, 7, 5, 8, 6]) for _ in range(2)]
    counts = [sum(map(len, plan_step_micro_batches(c, max_sequences=8, max_tokens=budget)))
              for c in (long_rank, short_rank)]  # fmt: skip
    assert counts[0] > counts[1]
    most = max(counts)  # what an all-reduce(max) gives every process
    for chunks in (long_rank, short_rank):
        plans = plan_step_micro_batches(chunks, max_sequences=8, max_tokens=budget, min_groups=most)
        assert sum(map(len, plans)) == most
        for r, groups in zip(chunks, plans, strict=True):
            _covers(r, groups)
            assert all(_padded(r, g) <= budget or len(g) == 1 for g in groups)


def test_planner_refuses_nonsense_caps():
    r = _mixed(n=4)
    with pytest.raises(ValueError, match="max_sequences"):
        plan_micro_batches(r, max_sequences=0, max_tokens=None)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches(r, max_sequences=2, max_tokens=0)


def test_planner_and_select_on_a_simulated_gpu():
    """Rollouts live on the compute device (opd.device): the planner reads the masks back once and hands
    out CPU indices, which CUDA indexing accepts; the result equals the CPU run."""
    cpu = _mixed(5, 10)
    want = plan_micro_batches(cpu, max_sequences=4, max_tokens=300, min_groups=5)
    with cuda_runtime_stubs(), fake_cuda() as gpu:
        roll = cpu.to(gpu)
        got = plan_micro_batches(roll, max_sequences=4, max_tokens=300, min_groups=5)
        assert [g.tolist() for g in got] == [g.tolist() for g in want]
        assert all(g.device.type == "cpu" for g in got)
        mb = roll.select(got[0])
        assert mb.response_ids.device.type == "cuda" and mb.prompt_index == cpu.select(want[0]).prompt_index
        assert torch.equal(mb.response_ids.cpu(), cpu.select(want[0]).response_ids)


# ----------------------------------------------------------------------------------------------------
# Config


def test_micro_batch_tokens_field_cli_and_yaml(tmp_path):
    assert TrainConfig().micro_batch_tokens is None
    assert parse_overrides(["--micro-batch-tokens", "4096"]) == {"micro_batch_tokens": 4096}
    assert load_config(None, ["--micro_batch_tokens", "4096"]).micro_batch_tokens == 4096
    p = tmp_path / "c.yaml"
    p.write_text("micro_batch_size: 16\nmicro_batch_tokens: 8192\n")
    cfg = load_config(p)
    assert cfg.micro_batch_size == 16 and cfg.micro_batch_tokens == 8192
    assert load_config(p, ["--micro-batch-tokens", "null"]).micro_batch_tokens is None
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        load_config(None, ["--micro_batch_tokens", "0"])


def test_in_backward_refuses_a_token_budget():
    ok = ["--optim.in_backward", "true", "--optim.max_grad_norm", "null", "--prompts_per_step", "2",
          "--rollout.rollouts_per_prompt", "2", "--micro_batch_size", "4", "--rollout.batch_size", "2"]  # fmt: skip
    assert load_config(None, ok).optim.in_backward
    with pytest.raises(ConfigError, match="in_backward") as info:
        load_config(None, [*ok, "--micro_batch_tokens", "1000000"])
    assert "micro_batch_tokens null" in str(info.value)


# --------------------------------------------------------------------------------------------------
# The trainer with micro_batch_tokens: memory changes, the update does not


def _train_run(tmp_path, name: str, **extra):
    from test_head_loss_trainer import _params, _trainer

    from opd.models.tiny import save_tiny_pair

    pair = save_tiny_pair(tmp_path / "pair")
    t = _trainer(pair, tmp_path / name, **extra)
    sizes: list[int] = []
    plan = t._micro_batches

    def recording(rollouts):
        micro = plan(rollouts)
        sizes.extend(len(mb) for _, _, mb in micro)
        return micro

    t._micro_batches = recording
    hist = t.train()
    return hist, _params(t), sizes


@pytest.mark.parametrize("signal", ["full", "topk"])
def test_a_token_budget_changes_the_split_not_the_update(tmp_path, signal):
    """Loss normalisation is global (the step's token count), so splitting a step into micro-batches by
    token budget gives the same losses, metrics and weights as one micro-batch per rollout chunk."""
    ha, pa, sa = _train_run(tmp_path, "seq", **{"loss.signal": signal})
    hb, pb, sb = _train_run(tmp_path, "tok", micro_batch_tokens=24, **{"loss.signal": signal})
    assert max(sa) > 1 and len(sb) > len(sa), (sa, sb)  # the budget really split the step differently
    for ma, mb in zip(ha, hb, strict=True):
        for key in ("loss", "grad_norm", "overlap_ratio", "entropy_student", "reward_mean"):
            assert mb[key] == pytest.approx(ma[key], rel=1e-5, abs=1e-7), key
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_processes_agree_on_the_micro_batch_count(tmp_path):
    """sharding fsdp reduce-scatters on every backward: with a token budget, processes whose rollouts differ
    in length would plan different counts and hang; the trainer agrees on the largest. 2 sharded processes
    with a budget train like 1 process without one."""
    import json

    from safetensors.torch import load_file
    from test_trainer import _args, _cli, _torchrun

    from opd.models.tiny import save_tiny_pair

    pair = save_tiny_pair(tmp_path / "pair")
    extra = {"optim.max_grad_norm": "null", "loss.signal": "full", "checkpoint_every": 100}
    one = _cli(_args(pair, tmp_path / "one", steps=2, **extra))
    out, _ = one.communicate(timeout=600)
    assert one.returncode == 0, out
    two = _torchrun(_args(pair, tmp_path / "two", steps=2, sharding="fsdp", micro_batch_tokens=20, **extra))
    assert two.returncode == 0, two.stdout + two.stderr
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-5)


def test_the_trainer_plans_the_count_agreed_across_processes(tmp_path):
    """With a token budget, a process plans at least as many micro-batches as the busiest process (here a
    simulated peer that needed 3 more), every row still trained on exactly once."""
    import types

    from test_head_loss_trainer import _trainer

    from opd.models.tiny import save_tiny_pair

    pair = save_tiny_pair(tmp_path / "pair")
    t = _trainer(pair, tmp_path / "run", micro_batch_tokens=10_000)
    rollouts = t._rollouts(1, t.cursor.next_indices(t.cfg.prompts_per_step))
    alone = t._micro_batches(rollouts)
    t.acc = types.SimpleNamespace(num_processes=2, device=t.acc.device)
    t._gather_max_row = lambda row: row + 3  # the other process planned 3 more micro-batches
    agreed = t._micro_batches(rollouts)
    assert len(agreed) == len(alone) + 3
    assert sum(len(mb) for _, _, mb in agreed) == sum(len(r) for r in rollouts)
