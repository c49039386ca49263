"""Activation checkpointing and torch.compile change how a step is computed, not what it computes."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama


def _train_two_steps(tokenizer, **options):
    from msft_fast.data.packing import collate, plan_epoch
    from msft_fast.distributed import init_distributed, parallelize, reshard_all, shutdown_distributed
    from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks
    from test_packing import _tasks

    ctx = init_distributed()
    try:
        lm = tiny_llama(tokenizer, seed=4)
        model = CausalLMWithTaskLoss(lm, num_tasks=2)
        parallelize(model, decoder_blocks(lm), torch.float32, ctx.device, **options)
        names = [n for n, _ in model.named_parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        docsets = [t.train for t in _tasks(7, 5, seed=3)]
        plans = plan_epoch(docsets, [0, 1], 400, seed=0, epoch=0)
        losses, grads = [], []
        for plan in plans[:2]:  # two micro-batches of different lengths
            loss, _ = model(collate(plan, docsets, [0, 1]))
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad.to_local().clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            model(collate(plans[0], docsets, [0, 1]))  # an evaluation-style forward ...
        reshard_all(model)  # ... after which every parameter is a shard again
        params = [p.detach().to_local().clone() for p in model.parameters()]
        return names, losses, grads, params
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_steps(tokenizer, mode):
    names0, loss0, grads0, params0 = _train_two_steps(tokenizer)
    names1, loss1, grads1, params1 = _train_two_steps(tokenizer, activation_checkpointing=mode, checkpoint_every=2)
    assert names1 == names0  # parameter names (and so the exported folder) are unchanged
    assert loss1 == loss0
    for g0, g1 in zip(grads0, grads1):
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))


@pytest.mark.slow
def test_compiled_blocks_give_the_same_steps_to_rounding(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    names0, loss0, grads0, params0 = _train_two_steps(tokenizer)
    names1, loss1, grads1, params1 = _train_two_steps(tokenizer, compile=True, activation_checkpointing="full")
    assert names1 == names0
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for g0, g1 in zip(grads0, grads1):
        for a, b in zip(g0, g1):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(params0, params1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
