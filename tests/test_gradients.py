"""One optimizer step's gradients against an independent computation: the plain HF model in float64,
each document of the step on its own (no packing, no fused loss, no FSDP), `F.cross_entropy` summed
over the step's trained tokens and divided by their global count. The trainer runs it packed,
sharded and accumulated: 1 rank with 4 micro-batches per step, and 2 ranks with 2 each (the same 4
micro-batches). A normalisation that both share (per micro-batch, per rank, per document) fails here. The
recorded gradient norm is the reference's, and with train.grad_clip the optimizer gets the reference
scaled by min(1, clip / ||g||).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import demo_tasks, kill_process_tree
from hf_reference import document, document_loss_sum

from msft_fast.config import load_config
from msft_fast.data.loader import MixtureLoader
from msft_fast.data.tasks import load_tasks

pytestmark = pytest.mark.slow

MICRO_BATCHES = 4  # per optimizer step, over all ranks


def _overrides(tmp_path, demo_dir, model_dir, out, grad_accum: int) -> list[str]:
    tasks = demo_tasks(demo_dir, ("upper", "noisy_codes", "sort"))  # chat and prompt/completion rows
    return [f"output_dir={out}", f"model.path={model_dir}", f"data.tasks=[{tasks}]", "data.max_seq_len=64",
            "data.tokens_per_batch=256", f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false",
            "method=sft", "train.epochs=0.1", "msft.evals_per_epoch=1", "train.grad_clip=0",
            f"train.grad_accum={grad_accum}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir, user_model_dir):
    """Loss and float64 gradients of step 1, from the plain HF model, one document at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("gradients")
    cfg = load_config(None, _overrides(tmp, demo_dir, user_model_dir, tmp / "unused", MICRO_BATCHES))
    tasks = load_tasks(cfg.data, AutoTokenizer.from_pretrained(user_model_dir))
    plans = MixtureLoader(tasks, cfg.data.tokens_per_batch, cfg.train.seed, rank=0, world_size=1,
                          grad_accum=MICRO_BATCHES).step_plans(0, 0)
    assert len(plans) == MICRO_BATCHES
    model = AutoModelForCausalLM.from_pretrained(user_model_dir, dtype=torch.float64)
    loss_sum, tokens, per_batch = 0.0, 0, []
    for plan in plans:
        n_batch = 0
        for t, d in zip(plan.tasks, plan.docs):
            loss, n = document_loss_sum(model, *document(tasks[t].train, int(d)))
            loss_sum, n_batch = loss_sum + loss, n_batch + n
        tokens += n_batch
        per_batch.append(n_batch)
    # Micro-batches with different numbers of trained tokens: a mean per micro-batch would differ.
    assert len(set(per_batch)) > 1, per_batch
    loss = loss_sum / tokens
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return tmp, loss.item(), tokens, grads


def _assert_matches(reference, out, grads_path, clip: float = 0.0):
    """The first step's gradients as the optimizer got them: the reference, scaled by
    min(1, clip / ||g||) with train.grad_clip=clip; the recorded grad_norm is ||g|| before clipping."""
    _, loss, tokens, want = reference
    norm = torch.sqrt(sum((g * g).sum() for g in want.values())).item()
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    got = torch.load(grads_path)
    assert {name.removeprefix("lm."): None for name in got}.keys() == want.keys()
    for name, g in got.items():
        ref = want[name.removeprefix("lm.")] * scale
        error = (g.double() - ref).norm() / ref.norm()
        assert error < 1e-5, (name, float(error))  # fp32 rounding: about 3e-7 here
    with open(os.path.join(out, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["loss_tokens"] == tokens
    assert first["loss"] == pytest.approx(loss, rel=1e-6)
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-5)


def _clip_of(reference, clipped: bool) -> float:
    """train.grad_clip: off, or a quarter of the first step's gradient norm (so clipping acts)."""
    norm = torch.sqrt(sum((g * g).sum() for g in reference[3].values())).item()
    return round(norm / 4, 6) if clipped else 0.0


@pytest.mark.parametrize("clipped", [False, True], ids=["unclipped", "clipped"])
def test_one_rank_with_accumulation_matches_the_plain_hf_gradient(reference, demo_dir, user_model_dir, clipped):
    from first_step_gradients import train_saving_first_gradients

    tmp, clip = reference[0], _clip_of(reference, clipped)
    out, grads = tmp / f"one-{clipped}", tmp / f"one-{clipped}.pt"
    train_saving_first_gradients(load_config(None, [*_overrides(tmp, demo_dir, user_model_dir, out, MICRO_BATCHES),
                                                    f"train.grad_clip={clip}"]), str(grads))
    _assert_matches(reference, out, grads, clip)


@pytest.mark.multiprocess
@pytest.mark.parametrize("clipped", [False, True], ids=["unclipped", "clipped"])
def test_two_ranks_with_accumulation_match_the_plain_hf_gradient(reference, demo_dir, user_model_dir, clipped):
    tmp, clip = reference[0], _clip_of(reference, clipped)
    out, grads = tmp / f"two-{clipped}", tmp / f"two-{clipped}.pt"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "first_step_gradients.py")
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script, str(grads), *_overrides(tmp, demo_dir, user_model_dir, out, MICRO_BATCHES // 2),
                             f"train.grad_clip={clip}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    _assert_matches(reference, out, grads, clip)
