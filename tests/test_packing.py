"""Packing: steps that train the mixture, little padding, deterministic epochs, collated fields,
document isolation, rank dealing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from msft_fast.config import DataConfig, TaskConfig
from msft_fast.data.formats import IGNORE_INDEX
from msft_fast.data.loader import MixtureLoader
from msft_fast.data.packing import (
    STATIC_MULTIPLE, MicroBatchPlan, best_fit_pack, collate, empty_batch, interleave, mixing_tv, pack_in_order,
    pad_to, padding_fraction, plan_epoch, static_length,
)
from msft_fast.data.tasks import DocSet, TaskData, load_tasks
from msft_fast.model import CausalLMWithTaskLoss


def _docset(lengths, seed=0) -> DocSet:
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    ids = rng.integers(8, 100, total).astype(np.int32)
    labels = np.where(rng.random(total) < 0.7, np.roll(ids, -1), IGNORE_INDEX).astype(np.int32)
    labels[starts + lengths - 1] = IGNORE_INDEX
    loss_tokens = np.array([(labels[s : s + n] != IGNORE_INDEX).sum() for s, n in zip(starts, lengths)])
    return DocSet(ids, labels, starts, lengths, loss_tokens)


def _tasks(*sizes, seed=0) -> list[TaskData]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        ds = _docset(rng.integers(3, 60, n), seed=seed + i)
        out.append(TaskData(f"t{i}", i, ds, ds))
    return out


def test_best_fit_pack_places_every_item_once_within_capacity():
    lengths = np.random.default_rng(0).integers(1, 97, 1001)
    bins = best_fit_pack(lengths, 100)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 100 for b in bins)
    # Close to the fewest bins possible (total tokens / capacity).
    lower_bound = int(np.ceil(lengths.sum() / 100))
    assert len(bins) <= lower_bound * 1.05 + 1


def test_best_fit_pack_rejects_a_document_longer_than_the_capacity():
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_pack(np.array([5, 11]), 10)


def test_plan_epoch_is_deterministic_per_seed_and_epoch_and_covers_each_document_once():
    tasks = _tasks(50, 13, 120)
    docsets = [t.train for t in tasks]
    a = plan_epoch(docsets, [0, 1, 2], 256, seed=3, epoch=1)
    b = plan_epoch(docsets, [0, 1, 2], 256, seed=3, epoch=1)
    c = plan_epoch(docsets, [0, 1, 2], 256, seed=3, epoch=2)
    key = lambda plans: [(p.tasks.tolist(), p.docs.tolist()) for p in plans]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    seen = sorted((t, d) for p in a for t, d in zip(p.tasks.tolist(), p.docs.tolist()))
    assert seen == sorted((t, d) for t in range(3) for d in range(len(docsets[t])))
    assert all(p.num_tokens <= 256 for p in a)
    # Only the active tasks are planned.
    only = plan_epoch(docsets, [1], 256, seed=3, epoch=1)
    assert {t for p in only for t in p.tasks.tolist()} == {1}


def _tasks_of_lengths(spec, seed=0) -> list[TaskData]:
    """spec: (documents, mean length) per task; lengths within +-40% of the mean."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (n, mean) in enumerate(spec):
        ds = _docset(np.maximum(3, np.round(rng.uniform(0.6, 1.4, n) * mean)).astype(np.int64), seed=seed + i)
        out.append(TaskData(f"t{i}", i, ds, ds))
    return out


# Tasks whose documents differ 8x in length (8 to 64 tokens on average) and 10x in count.
EIGHT_X = [(1800, 8), (180, 64), (750, 24), (450, 40)]


@pytest.mark.parametrize("capacity,per_step", [(512, 1), (256, 2), (1024, 1)])
def test_every_step_trains_the_mixture_when_tasks_differ_8x_in_length(capacity, per_step):
    """Each optimizer step's task shares of trained tokens stay near the epoch's (mean TV <= 0.10)
    with padding <= 3%, on every seed; best-fit-decreasing over the whole epoch (the old plan) sorts
    by length and with it by task, which the same measure catches."""
    docsets = [t.train for t in _tasks_of_lengths(EIGHT_X)]
    for seed in range(3):
        plans = plan_epoch(docsets, range(4), capacity, seed=seed, epoch=0)
        assert mixing_tv(plans, docsets, per_step) <= 0.10, seed
        assert padding_fraction(plans, capacity) <= 0.03, seed
    task_of = np.concatenate([np.full(len(d), t) for t, d in enumerate(docsets)])
    doc_of = np.concatenate([np.arange(len(d)) for d in docsets])
    lengths = np.concatenate([d.lengths for d in docsets])
    sorted_plans = [MicroBatchPlan(task_of[b], doc_of[b], int(lengths[b].sum())) for b in best_fit_pack(lengths, capacity)]
    shuffled = [sorted_plans[i] for i in np.random.default_rng(0).permutation(len(sorted_plans))]
    assert mixing_tv(shuffled, docsets, per_step) > 0.3


def test_the_demo_mixture_is_mixed_in_every_step_with_little_padding(tmp_path, tokenizer):
    """`make demo`'s data and settings (the calibrated variant, 256-token micro-batches, one per
    step): every task in nearly every step, shares near the epoch's, padding at most 3%."""
    from msft_fast.demo_data import write_demo_mixture

    entries = write_demo_mixture(tmp_path / "demo", seed=0, variant="calibrated")
    cfg = DataConfig(tasks=[TaskConfig(e["name"], e["train"], e["val"]) for e in entries], max_seq_len=64,
                     tokens_per_batch=256, cache_dir=str(tmp_path / "cache"))
    docsets = [t.train for t in load_tasks(cfg, tokenizer)]
    for seed in range(3):
        plans = plan_epoch(docsets, range(len(docsets)), 256, seed=seed, epoch=0)
        assert mixing_tv(plans, docsets, 1) <= 0.10
        assert padding_fraction(plans, 256) <= 0.03
        one_task = [p for p in plans if len(set(p.tasks.tolist())) == 1]
        assert len(one_task) <= 1  # at most the epoch's last, partly filled micro-batch


def test_mixing_tv_is_the_mean_distance_of_each_steps_shares_from_the_epochs():
    docsets = [_docset([4, 4, 4, 4]), _docset([4, 4, 4, 4])]
    tokens = [int(d.loss_tokens.sum()) for d in docsets]

    def plan(*pairs):
        return MicroBatchPlan(np.array([t for t, _ in pairs]), np.array([d for _, d in pairs]), 4 * len(pairs))

    by_task = [plan((0, 0), (0, 1), (0, 2), (0, 3)), plan((1, 0), (1, 1), (1, 2), (1, 3))]
    # Each step holds one task: its distance from the epoch's shares is 1 - that task's share.
    share0 = tokens[0] / sum(tokens)
    assert mixing_tv(by_task, docsets, 1) == pytest.approx(((1 - share0) + share0) / 2)
    assert mixing_tv(by_task, docsets, 2) == 0.0  # one step holds the whole epoch
    assert mixing_tv([], docsets, 1) == 0.0


def test_interleave_spreads_each_tasks_weight_evenly_through_the_order():
    rng = np.random.default_rng(0)
    task_of = np.repeat([0, 1, 2], [300, 30, 90])
    weights = np.where(task_of == 1, 20, np.where(task_of == 2, 5, 1)).astype(np.float64)
    order = interleave(task_of, weights, rng)
    assert sorted(order.tolist()) == list(range(len(task_of)))
    share = np.bincount(task_of, weights) / weights.sum()
    cum = np.cumsum(np.eye(3)[task_of[order]] * weights[order, None], axis=0)
    # After any prefix, each task has had its share of the weight so far, give or take the largest
    # document; grouped by task (a sorted order), the drift is a whole task's weight.
    drift = np.abs(cum - cum.sum(axis=1, keepdims=True) * share)
    assert drift.max() <= 20
    by_task = np.cumsum(np.eye(3)[task_of] * weights[:, None], axis=0)
    assert np.abs(by_task - by_task.sum(axis=1, keepdims=True) * share).max() > 100


def test_pack_in_order_keeps_the_order_and_fills_gaps_from_a_little_ahead():
    lengths = np.array([6, 6, 6, 5, 3, 9, 2, 6])
    bins = pack_in_order(np.arange(8), lengths, capacity=16, lookahead=4)
    # 6+6, then the gap of 4 takes the 3 (the next 6 does not fit); 6+5, then the 2 from the next few; 9+6.
    assert bins == [[0, 1, 4], [2, 3, 6], [5, 7]]
    assert sorted(i for b in bins for i in b) == list(range(8))
    with pytest.raises(ValueError, match="does not fit"):
        pack_in_order(np.arange(2), np.array([5, 17]), capacity=16)


def test_padding_fraction_on_the_demo_mixture_is_under_two_percent(demo_dir, tokenizer, tmp_path):
    names = ["upper", "noisy_codes", "reverse", "sort", "add"]
    cfg = DataConfig(
        tasks=[TaskConfig(n, str(demo_dir / n / "train.jsonl"), str(demo_dir / n / "val.jsonl")) for n in names],
        max_seq_len=128, tokens_per_batch=2048, cache_dir=str(tmp_path),
    )
    tasks = load_tasks(cfg, tokenizer)
    plans = plan_epoch([t.train for t in tasks], range(len(tasks)), 2048, seed=0, epoch=0)
    assert padding_fraction(plans, 2048) < 0.02


def test_collate_restarts_positions_and_never_predicts_across_documents():
    tasks = _tasks(7, 5)
    docsets = [t.train for t in tasks]
    plan = plan_epoch(docsets, [0, 1], 10_000, seed=0, epoch=0)[0]
    batch = collate(plan, docsets, task_ids=[4, 9])
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == batch.num_tokens == plan.num_tokens
    assert batch.max_seqlen == max(b - a for a, b in zip(cu, cu[1:]))
    for (a, b), t, d in zip(zip(cu, cu[1:]), plan.tasks.tolist(), plan.docs.tolist()):
        ds = docsets[t]
        s = int(ds.starts[d])
        assert batch.position_ids[a:b].tolist() == list(range(b - a))
        assert batch.input_ids[a:b].tolist() == ds.input_ids[s : s + b - a].tolist()
        assert batch.labels[a:b].tolist() == ds.labels[s : s + b - a].tolist()
        assert batch.labels[b - 1].item() == IGNORE_INDEX  # no document predicts into the next
        assert set(batch.task_ids[a:b].tolist()) == {[4, 9][t]}
    assert batch.num_loss_tokens == int((batch.labels != IGNORE_INDEX).sum())


def test_packed_logits_equal_each_document_run_alone(tokenizer):
    """Attention never crosses documents: the packed row gives each document's own logits."""
    lm = tiny_llama(tokenizer, seed=2)
    wrapper = CausalLMWithTaskLoss(lm, num_tasks=2)
    tasks = _tasks(6, 4, seed=5)
    docsets = [t.train for t in tasks]
    plan = plan_epoch(docsets, [0, 1], 10_000, seed=0, epoch=0)[0]
    assert len(plan.docs) == 10
    batch = collate(plan, docsets, [0, 1])
    with torch.no_grad():
        packed = lm.lm_head(wrapper.hidden_states(batch))
        cu = batch.cu_seqlens.tolist()
        for a, b in zip(cu, cu[1:]):
            alone = lm(input_ids=batch.input_ids[None, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=2e-5, rtol=1e-5)


def test_packed_loss_and_task_stats_match_per_document_cross_entropy(tokenizer):
    lm = tiny_llama(tokenizer, seed=3)
    wrapper = CausalLMWithTaskLoss(lm, num_tasks=2)
    tasks = _tasks(5, 3, seed=7)
    docsets = [t.train for t in tasks]
    plan = plan_epoch(docsets, [0, 1], 10_000, seed=0, epoch=0)[0]
    batch = collate(plan, docsets, [0, 1])
    with torch.no_grad():
        loss, stats = wrapper(batch)
        expect_sum = torch.zeros(2, dtype=torch.float64)
        expect_tokens = torch.zeros(2, dtype=torch.int64)
        for t, d in zip(plan.tasks.tolist(), plan.docs.tolist()):
            s, n = int(docsets[t].starts[d]), int(docsets[t].lengths[d])
            ids = torch.from_numpy(docsets[t].input_ids[s : s + n].astype(np.int64))
            labels = torch.from_numpy(docsets[t].labels[s : s + n].astype(np.int64))
            logits = lm(input_ids=ids[None], use_cache=False).logits[0].double()
            expect_sum[t] += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            expect_tokens[t] += int((labels != IGNORE_INDEX).sum())
    assert stats.tokens.tolist() == expect_tokens.tolist()
    torch.testing.assert_close(stats.loss_sum.double(), expect_sum, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(loss.double(), expect_sum.sum(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa", "packed_flex_attention"])
def test_static_shape_filler_changes_no_output_loss_or_statistic(tokenizer, attn):
    """pad_to's filler documents attend only to themselves and carry no label: the real tokens'
    hidden states, the loss, the per-task and the per-document statistics are those of the
    unpadded row, under each backend's way of keeping documents apart (buckets, position ids,
    a block mask)."""
    lm = tiny_llama(tokenizer, seed=4)
    lm.config._attn_implementation = attn
    wrapper = CausalLMWithTaskLoss(lm, num_tasks=2)
    tasks = _tasks(5, 4, seed=9)
    docsets = [t.train for t in tasks]
    batch = collate(plan_epoch(docsets, [0, 1], 10_000, seed=0, epoch=0)[0], docsets, [0, 1])
    n = batch.num_tokens
    length = static_length(n + 2 * STATIC_MULTIPLE + 5)  # three filler documents, the last a short one
    padded = pad_to(batch, length)
    assert padded.num_tokens == length and padded.num_loss_tokens == batch.num_loss_tokens
    assert padded.filler_docs == 3 and padded.real_docs == len(batch.doc_lengths)
    assert (padded.labels[n:] == IGNORE_INDEX).all() and padded.doc_lengths[:padded.real_docs] == batch.doc_lengths
    assert padded.position_ids[n:].max() < STATIC_MULTIPLE and padded.cu_seqlens[-1] == length
    with torch.no_grad():
        torch.testing.assert_close(wrapper.hidden_states(padded)[:n], wrapper.hidden_states(batch), atol=1e-5, rtol=1e-5)
        loss, tasks_stats, docs_stats = wrapper(batch, per_document=True)
        p_loss, p_tasks, p_docs = wrapper(padded, per_document=True)
    torch.testing.assert_close(p_loss, loss, atol=1e-4, rtol=1e-5)
    for mine, theirs in ((p_tasks, tasks_stats), (p_docs, docs_stats)):
        assert mine.tokens.tolist() == theirs.tokens.tolist() and mine.correct.tolist() == theirs.correct.tolist()
        torch.testing.assert_close(mine.loss_sum, theirs.loss_sum, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_static_loader_gives_every_micro_batch_one_token_count(world_size):
    """Under static shapes every micro-batch a rank runs, training, evaluation and the empty ones that
    keep ranks in lockstep, has exactly static_length(tokens_per_batch) tokens, and the plan is the
    unpadded one: the same documents, trained tokens and steps."""
    tasks = _tasks(40, 25, seed=0)
    length = static_length(200)
    assert length == 256 and static_length(256) == 256
    empties = 0
    for rank in range(world_size):
        static = MixtureLoader(tasks, 200, 0, rank, world_size, 2, static_tokens=length)
        plain = MixtureLoader(tasks, 200, 0, rank, world_size, 2)
        steps = static.steps_in_epoch(0)
        assert steps == plain.steps_in_epoch(0) and steps >= 3
        batches = [b for s in range(steps) for b in static.step_batches(0, s)] + static.eval_batches()
        assert {b.num_tokens for b in batches} == {length}
        empties += sum(b.real_docs == 1 and b.num_loss_tokens == 0 for s in range(steps) for b in static.step_batches(0, s))
        for s in range(steps):
            assert [b.num_loss_tokens for b in static.step_batches(0, s)] == \
                [b.num_loss_tokens for b in plain.step_batches(0, s)]
    assert static.packing_stats(0)["padding"] > plain.packing_stats(0)["padding"]
    # 11 micro-batches: on 2 ranks the last step leaves one rank an empty micro-batch, padded too
    assert len(plain.epoch_plan(0)) == 11 and empties == (world_size - 1)


@pytest.mark.parametrize("world_size,grad_accum", [(2, 2), (3, 1), (4, 3)])
def test_ranks_get_the_single_rank_micro_batches_in_equal_numbers(world_size, grad_accum):
    tasks = _tasks(40, 9, 61)
    single = MixtureLoader(tasks, 200, seed=1, rank=0, world_size=1, grad_accum=world_size * grad_accum)
    ranks = [MixtureLoader(tasks, 200, seed=1, rank=r, world_size=world_size, grad_accum=grad_accum)
             for r in range(world_size)]
    steps = single.steps_in_epoch(0)
    assert all(r.steps_in_epoch(0) == steps for r in ranks)
    for step in range(steps):
        want = sorted(b.input_ids.tolist() for b in single.step_batches(0, step))
        per_rank = [r.step_batches(0, step) for r in ranks]
        assert len({len(b) for b in per_rank}) == 1  # equal counts: no rank waits at an epoch's end
        got = [b.input_ids.tolist() for bs in per_rank for b in bs if b.num_loss_tokens > 0 or b.num_tokens > 1]
        assert sorted(got) == want
        # Tokens are balanced: ranks differ by at most the spread of one step's micro-batch sizes
        # (ranks that run short at an epoch's end are the exception: they get an empty one).
        loads = [sum(b.num_tokens for b in bs if b.num_loss_tokens > 0 or b.num_tokens > 1) for bs in per_rank]
        sizes = [p.num_tokens for p in single.step_plans(0, step)]
        if len(sizes) % world_size == 0:
            assert max(loads) - min(loads) <= max(sizes) - min(sizes)
        assert all(r.step_loss_tokens(0, step) == single.step_loss_tokens(0, step) for r in ranks)
        assert single.step_loss_tokens(0, step) == sum(b.num_loss_tokens for b in single.step_batches(0, step))


def test_empty_batch_carries_no_loss():
    batch = empty_batch()
    assert batch.num_tokens == 1 and batch.num_loss_tokens == 0
    assert batch.labels.tolist() == [IGNORE_INDEX]


def test_ranks_get_balanced_token_counts():
    from types import SimpleNamespace

    from msft_fast.data.loader import rank_share

    plans = [SimpleNamespace(num_tokens=n) for n in (5, 8, 6, 7, 1, 9, 3, 9)]
    for world in (1, 2, 3, 4):
        shares = [rank_share(plans, r, world) for r in range(world)]
        assert sorted(id(p) for s in shares for p in s) == sorted(id(p) for p in plans)  # each once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    loads = [sum(p.num_tokens for p in rank_share(plans, r, 2)) for r in range(2)]
    assert loads == [23, 25]  # 9+7+6+1 and 9+8+5+3; dealt in plan order they would be 15 and 33
