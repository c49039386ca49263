"""How a step is computed (activation checkpointing, torch.compile, FSDP2 or a plain module at one CPU
rank) changes nothing in what it computes."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import demo_tasks, tiny_llama
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _train_two_steps(tokenizer, **options):
    from msft_fast.data.packing import collate, plan_epoch
    from msft_fast.runtime.distributed import init_distributed, parallelize, reshard_all, shutdown_distributed
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
            grads.append([_local(p.grad).clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            model(collate(plans[0], docsets, [0, 1]))  # an evaluation-style forward ...
        reshard_all(model)  # ... after which every parameter is a shard again
        params = [_local(p.detach()).clone() for p in model.parameters()]
        return names, losses, grads, params, isinstance(model, FSDPModule)
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_steps(tokenizer, mode):
    names0, loss0, grads0, params0, _ = _train_two_steps(tokenizer)
    names1, loss1, grads1, params1, _ = _train_two_steps(tokenizer, activation_checkpointing=mode, checkpoint_every=2)
    assert names1 == names0  # parameter names (and so the exported folder) are unchanged
    assert loss1 == loss0
    for g0, g1 in zip(grads0, grads1):
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))


def test_one_cpu_process_in_fp32_runs_without_fsdp2_and_computes_the_same_steps(tokenizer):
    """train.fsdp=auto leaves one CPU process in fp32 a plain module (FSDP2 would shard over one
    rank, cast fp32 to fp32 and reduce over a group of one); its steps equal FSDP2's bitwise."""
    names0, loss0, grads0, params0, sharded0 = _train_two_steps(tokenizer, fsdp="always")
    names1, loss1, grads1, params1, sharded1 = _train_two_steps(tokenizer)
    assert sharded0 and not sharded1
    assert names1 == names0 and loss1 == loss0
    for g0, g1 in zip(grads0, grads1):
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))


def test_fsdp2_stays_wherever_it_does_something(tokenizer, monkeypatch):
    from msft_fast.runtime import distributed
    from msft_fast.runtime.distributed import init_distributed, needs_fsdp, parallelize, shutdown_distributed
    from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks

    cpu = torch.device("cpu")
    assert not needs_fsdp(torch.float32, cpu)
    assert needs_fsdp(torch.bfloat16, cpu)  # bf16 compute from fp32 masters: FSDP2's mixed precision does it
    assert needs_fsdp(torch.float32, torch.device("cuda", 0))  # moves each rank's shards onto the device
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    assert needs_fsdp(torch.float32, cpu)  # several ranks: sharding
    monkeypatch.undo()
    ctx = init_distributed()
    try:
        for dtype, fsdp, sharded in ((torch.float32, "auto", False), (torch.bfloat16, "auto", True),
                                     (torch.float32, "always", True)):
            lm = tiny_llama(tokenizer)
            model = CausalLMWithTaskLoss(lm, num_tasks=1)
            parallelize(model, decoder_blocks(lm), dtype, ctx.device, fsdp=fsdp)
            assert isinstance(model, FSDPModule) == sharded
            assert all(isinstance(p, DTensor) == sharded for p in model.parameters())
    finally:
        shutdown_distributed()


@pytest.mark.slow
def test_an_msft_run_with_checkpoints_is_the_same_with_or_without_fsdp2(tmp_path, demo_dir):
    """The whole trainer on a plain module (snapshots and roll-backs, a checkpoint, evaluation,
    export) against the same run under FSDP2 at one rank: the same history, metrics and final weights."""
    import metric_callbacks
    from safetensors.torch import load_file

    from msft_fast.config import load_config
    from msft_fast.run import train

    tasks = demo_tasks(demo_dir, ("upper", "noisy_codes", "sort"))
    runs = {}
    for fsdp in ("always", "auto"):
        out = tmp_path / fsdp
        metric_callbacks._EVALS[0] = 0  # the scripted metric counts its calls: each run starts afresh
        history = train(load_config(None, [
            f"output_dir={out}", "method=msft", f"data.tasks=[{tasks}]", "data.max_seq_len=64",
            "data.tokens_per_batch=256", f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false",
            "train.lr=5e-3", "train.epochs=1", "train.grad_accum=2", "train.checkpoint_every=3",
            "msft.budget_epochs=0.5", "msft.evals_per_epoch=4", "msft.max_stages=2",
            "msft.metric=metric_callbacks:scripted", f"train.fsdp={fsdp}"]))
        metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
        runs[fsdp] = history, metrics, load_file(str(out / "final" / "model.safetensors"))
    (h0, m0, w0), (h1, m1, w1) = runs["always"], runs["auto"]
    assert h0["stages"][0]["excluded"] == "upper" and h0["stages"][0]["rollback_to_eval"] == 1  # a real roll-back
    assert [(s["excluded"], s["rollback_to_eval"]) for s in h0["stages"]] == \
        [(s["excluded"], s["rollback_to_eval"]) for s in h1["stages"]]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in m0] == [(r["step"], r["loss"], r["grad_norm"]) for r in m1]
    assert [{k: t["val_loss"] for k, t in e["tasks"].items()} for e in h0["evals"]] == \
        [{k: t["val_loss"] for k, t in e["tasks"].items()} for e in h1["evals"]]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_steps_to_rounding(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    names0, loss0, grads0, params0, _ = _train_two_steps(tokenizer)
    names1, loss1, grads1, params1, _ = _train_two_steps(tokenizer, compile=True, activation_checkpointing="full")
    assert names1 == names0
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for g0, g1 in zip(grads0, grads1):
        for a, b in zip(g0, g1):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(params0, params1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
