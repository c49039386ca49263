"""Learning-rate schedule (and its restore), FLOP counting and bitwise snapshot restore under FSDP2."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

from msft_fast.config import TrainConfig
from msft_fast.flops import FlopCounter
from msft_fast.training.optim import lr_multiplier


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays_to_the_floor(schedule):
    cfg = TrainConfig(warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    total = 20
    values = [lr_multiplier(s, total, cfg) for s in range(total)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert max(values) == pytest.approx(1.0)
    if schedule == "constant":
        assert values[4:] == pytest.approx([1.0] * 16)
    else:
        assert all(a >= b for a, b in zip(values[4:], values[5:]))
        assert lr_multiplier(total, total, cfg) == pytest.approx(0.1)
    if schedule == "cosine":
        mid = 4 + 8  # halfway through the decay
        assert values[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_restoring_the_schedule_also_sets_the_lr_of_the_next_step():
    """A scheduler's loaded state sets what it reports, not the lr in the optimizer's groups (only
    scheduler.step() writes those): after a roll-back the next step would take the newer lr.
    trainer_state.set_schedule puts the restored position's lr into the groups too."""
    import copy

    from msft_fast.training.optim import build_scheduler
    from msft_fast.training.trainer_state import set_schedule

    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(opt, 10, TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine"))
    opt.step()
    scheduler.step()
    saved, lr_then = copy.deepcopy(scheduler.state_dict()), scheduler.get_last_lr()
    for _ in range(3):
        opt.step()
        scheduler.step()
    scheduler.load_state_dict(saved)
    assert scheduler.get_last_lr() == lr_then and opt.param_groups[0]["lr"] != lr_then[0]  # the trap
    set_schedule(scheduler, opt, saved)
    assert [g["lr"] for g in opt.param_groups] == lr_then == [0.5]  # warm-up step 2 of 4


def test_flop_counter_counts_matmul_params_and_per_document_causal_attention(tokenizer):
    for tie in (False, True):
        lm = tiny_llama(tokenizer, tie=tie)
        counter = FlopCounter.for_model(lm)
        total = sum(p.numel() for p in lm.parameters())
        embed = lm.model.embed_tokens.weight.numel()
        assert counter.matmul_params == (total if tie else total - embed)
        attn_dim = lm.model.layers[0].self_attn.q_proj.out_features  # heads x head_dim, read off the module
        assert counter.num_layers == 2 and counter.attn_dim == attn_dim
        # One document of length 3, by hand: 2 layers x (QK^T + PV) x 2 flops x 6 causal pairs.
        attn = 2 * 2 * 2 * attn_dim * 6
        assert counter.attention_forward([3]) == attn
        assert counter.train(3, [3]) == 6 * counter.matmul_params * 3 + 3 * attn
        assert counter.eval(3, [3]) == 2 * counter.matmul_params * 3 + attn
        # Packing changes nothing: two documents cost their own attention, not a joint row's.
        assert counter.attention_forward([3, 5]) == counter.attention_forward([3]) + counter.attention_forward([5])
        assert counter.attention_forward([8]) > counter.attention_forward([3, 5])


def test_snapshot_after_an_evaluation_restores_bitwise_under_fsdp2(tokenizer):
    """After a forward without backward, FSDP2 leaves the root (embeddings, head) unsharded; the
    snapshot must still capture and restore the real shards of every parameter."""
    import numpy as np

    from msft_fast.data.packing import collate, plan_epoch
    from msft_fast.runtime.distributed import init_distributed, parallelize, shutdown_distributed
    from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks
    from msft_fast.state.snapshot import SnapshotPool
    from test_packing import _tasks

    ctx = init_distributed()
    try:
        lm = tiny_llama(tokenizer)
        model = CausalLMWithTaskLoss(lm, num_tasks=2)
        parallelize(model, decoder_blocks(lm), torch.float32, ctx.device, fsdp="always")
        docsets = [t.train for t in _tasks(6, 4, seed=1)]
        batch = collate(plan_epoch(docsets, [0, 1], 10_000, seed=0, epoch=0)[0], docsets, [0, 1])
        opt = torch.optim.SGD(model.parameters(), lr=0.5)

        with torch.no_grad():
            loss_at_snapshot = model(batch)[0].item()
        pool = SnapshotPool(capacity=1, device=ctx.device, with_optimizer=False)
        snap = pool.capture(model, opt, {})
        shards = [p.detach().to_local().clone() for p in model.parameters()]
        assert snap.nbytes == sum(t.numel() * 4 for t in shards)
        for _ in range(3):
            model(batch)[0].backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            assert model(batch)[0].item() != loss_at_snapshot
        pool.restore(snap, model, None)
        model.reshard()
        assert all(torch.equal(p.to_local(), s) for p, s in zip(model.parameters(), shards))
        with torch.no_grad():
            assert model(batch)[0].item() == loss_at_snapshot
        assert np.isfinite(loss_at_snapshot)
    finally:
        shutdown_distributed()
