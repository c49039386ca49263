"""DynamixSFT: how the bandit's proportions move for scripted rewards (prior-scaled Boltzmann
probabilities with a uniform floor, min-max normalised rewards, EMA), the relative loss drop, steps
drawn from the proportions; a run end to end whose look-ahead steps are undone bitwise and counted,
resumed bitwise after a crash."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import demo_tasks

from msft_fast.config import load_config
from msft_fast.methods.dynamix import (
    normalise, prior_proportions, relative_loss_drop, sampling_probabilities, update_estimates,
)


def _softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def test_first_proportions_are_the_prior_mixed_with_the_uniform_floor():
    p0 = prior_proportions([500, 300, 200])
    assert p0.tolist() == [0.5, 0.3, 0.2]
    p = sampling_probabilities(np.zeros(3), p0, beta=4.0, gamma=0.3)
    assert p == pytest.approx([0.7 * 0.5 + 0.1, 0.7 * 0.3 + 0.1, 0.7 * 0.2 + 0.1], abs=1e-15)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)
    # gamma = 1: uniform whatever Q; gamma = 0 and beta = 0: the original mixture.
    assert sampling_probabilities(np.array([5.0, 0, 0]), p0, 4.0, 1.0) == pytest.approx([1 / 3] * 3)
    assert sampling_probabilities(np.array([5.0, 0, 0]), p0, 0.0, 0.0) == pytest.approx(p0)
    # A task without documents (prior 0) is never drawn and takes no share of the floor.
    p = sampling_probabilities(np.array([0.0, 9.0, 0.0]), np.array([0.6, 0.0, 0.4]), 4.0, 0.3)
    assert p[1] == 0 and p.sum() == pytest.approx(1.0) and min(p[0], p[2]) >= 0.15


def test_the_proportions_move_toward_the_task_whose_look_ahead_pays_most_and_back():
    p0 = np.array([0.2, 0.5, 0.3])
    beta, gamma, alpha = 4.0, 0.3, 0.95
    q = np.zeros(3)
    shares = []
    # Task 0's loss drops most, task 2's least, at every update: normalised rewards 1, 0.5, 0.
    for t in range(1, 41):
        r = normalise(np.array([0.06, 0.04, 0.02]))
        assert r == pytest.approx([1.0, 0.5, 0.0])
        q = update_estimates(q, r, alpha)
        assert q == pytest.approx((1 - alpha ** t) * r)  # the EMA from Q = 0
        p = sampling_probabilities(q, p0, beta, gamma)
        assert p == pytest.approx((1 - gamma) * _softmax(beta * q + np.log(p0)) + gamma / 3)
        shares.append(p)
    shares = np.array(shares)
    assert np.all(np.diff(shares[:, 0]) > 0) and np.all(np.diff(shares[:, 2]) < 0)
    # Anchored to the prior: after 40 updates Q is 87% of the way to (1, 0.5, 0) and the favoured
    # task, which holds 20% of the documents, still has less than the 0.2 * e^4 weight it would
    # get with Q at its limit.
    limit = (1 - gamma) * _softmax(beta * np.array([1.0, 0.5, 0.0]) + np.log(p0)) + gamma / 3
    assert shares[0, 0] < shares[-1, 0] < limit[0] and shares[-1, 0] > 0.5
    # The rewards turn round: task 2 now pays most; its share rises again, task 0's falls.
    for _ in range(60):
        q = update_estimates(q, normalise(np.array([0.0, 0.01, 0.03])), alpha)
    p = sampling_probabilities(q, p0, beta, gamma)
    assert p[2] > p[1] > p[0] and p[0] < shares[-1, 0]
    # Equal rewards carry no information: normalised to 0, Q decays and the mixture returns to the start.
    for _ in range(400):
        q = update_estimates(q, normalise(np.array([0.02, 0.02, 0.02])), alpha)
    assert sampling_probabilities(q, p0, beta, gamma) == pytest.approx((1 - gamma) * p0 + gamma / 3, abs=1e-6)


def test_relative_loss_drop_and_min_max_normalisation():
    before, after = np.array([2.0, 1.0, np.nan]), np.array([1.0, 1.5, 0.5])
    assert relative_loss_drop(before, after, 1e-8) == pytest.approx((0.5 - 0.5) / 2, abs=1e-8)
    assert relative_loss_drop(np.array([4.0]), np.array([3.0]), 1.0) == pytest.approx(0.2)
    assert math.isnan(relative_loss_drop(np.array([np.nan]), np.array([1.0]), 1e-8))
    assert normalise(np.array([-0.1, 0.3, 0.1])) == pytest.approx([0.0, 1.0, 0.5])
    assert normalise(np.array([np.nan, 0.3, 0.1])).tolist() == [0.0, 1.0, 0.0]  # a diverged look-ahead: worst
    assert normalise(np.array([0.2, 0.2])).tolist() == [0.0, 0.0]


def test_steps_are_drawn_from_the_proportions_deterministically(tokenizer, demo_dir, tmp_path):
    from msft_fast.config import DataConfig, TaskConfig
    from msft_fast.data.loader import MixtureLoader, ProportionalSampler
    from msft_fast.data.tasks import load_tasks

    names = ("upper", "noisy_codes", "sort")
    data = DataConfig(tasks=[TaskConfig(n, str(demo_dir / n / "train.jsonl"), str(demo_dir / n / "val.jsonl"))
                             for n in names], max_seq_len=64, tokens_per_batch=256, cache_dir=str(tmp_path / "cache"))
    tasks = load_tasks(data, tokenizer)
    loader = MixtureLoader(tasks, 256, seed=5, rank=0, world_size=2, grad_accum=2)
    sampler = ProportionalSampler(loader, np.array([0.7, 0.0, 0.3]))
    loader.set_sampler(sampler)
    counts = np.zeros(3)
    for step in range(60):
        plans = loader.step_plans(0, step)
        assert len(plans) == 4 and all(0 < p.num_tokens <= 256 for p in plans)  # every micro-batch filled
        assert all(p.num_tokens == sum(int(tasks[t].train.lengths[d]) for t, d in zip(p.tasks, p.docs)) for p in plans)
        assert sum(p.num_tokens for p in plans) > 0.9 * 4 * 256
        for p in plans:
            counts += np.bincount(p.tasks, minlength=3)
    share = counts / counts.sum()
    assert share[1] == 0 and share[0] == pytest.approx(0.7, abs=0.03)
    # The same (seed, epoch, step, proportions) gives the same step, in any loader; others differ.
    other = MixtureLoader(tasks, 256, seed=5, rank=1, world_size=2, grad_accum=2)
    other.set_sampler(ProportionalSampler(other, np.array([0.7, 0.0, 0.3])))
    same = lambda a, b: [(p.tasks.tolist(), p.docs.tolist()) for p in a] == [(p.tasks.tolist(), p.docs.tolist()) for p in b]  # noqa: E731
    assert same(other.step_plans(0, 7), loader.step_plans(0, 7))
    assert not same(loader.step_plans(1, 7), loader.step_plans(0, 7))
    # Ranks split a step's micro-batches; together they fill every document's slot once.
    tasks_of, _ = loader.documents_of(loader.step_plans(0, 3))
    slots = loader.document_slots(loader.step_plans(0, 3)) + other.document_slots(other.step_plans(0, 3))
    assert sorted(np.concatenate(slots).tolist()) == list(range(len(tasks_of)))
    sampler.set_proportions(np.array([0.3, 0.0, 0.7]))
    assert not same(other.step_plans(0, 7), loader.step_plans(0, 7))
    # A look-ahead batch holds one task's documents only.
    look = sampler.lookahead_plans(2, update=0)
    assert len(look) == 4 and all(set(p.tasks.tolist()) == {2} for p in look)


def _overrides(tmp_path, demo_dir, out, *extra):
    tasks = demo_tasks(demo_dir, ("upper", "noisy_codes"))
    return [f"output_dir={out}", f"data.tasks=[{tasks}]", "data.max_seq_len=64", "data.tokens_per_batch=512",
            f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false", "train.lr=3e-3", "train.epochs=2",
            "train.schedule=constant", "msft.evals_per_epoch=2", "method=dynamix", "dynamix.update_every=3",
            "train.checkpoint_every=3", *extra]


def _state_bytes(trainer) -> bytes:
    """This rank's weights and optimizer state, as bytes (bitwise comparison)."""
    from torch.distributed.tensor import DTensor

    def raw(t):
        return (t.to_local() if isinstance(t, DTensor) else t).detach().cpu().numpy().tobytes()

    parts = [raw(p) for p in trainer.model.parameters()]
    for p in trainer.model.parameters():
        for k, v in sorted(trainer.optimizer.state.get(p, {}).items()):
            parts.append(k.encode() + (raw(v) if torch.is_tensor(v) else repr(v).encode()))
    return b"".join(parts)


@pytest.mark.slow
def test_dynamix_end_to_end_look_ahead_undone_and_counted_and_resumed_bitwise(tmp_path, demo_dir, monkeypatch):
    from test_resume import _assert_same_run, _Crash, _crash_after

    from msft_fast.state.checkpoint import latest_checkpoint, read_meta
    from msft_fast.report import compare
    from msft_fast.run import train
    from msft_fast.training.trainer import Trainer

    looks = []
    original = Trainer.lookahead

    def checked(self, plans):
        state, flops, lr = _state_bytes(self), self.counters.train_flops, self.scheduler.get_last_lr()
        before, after = original(self, plans)
        assert _state_bytes(self) == state and self.scheduler.get_last_lr() == lr  # undone, bitwise
        looks.append((self.counters.train_flops - flops, before, after,
                      sorted(set(np.concatenate([p.tasks for p in plans]).tolist()))))
        return before, after

    monkeypatch.setattr(Trainer, "lookahead", checked)
    whole = str(tmp_path / "whole")
    history = train(load_config(None, _overrides(tmp_path, demo_dir, whole)))
    monkeypatch.undo()

    assert history["status"] == "finished" and history["method"] == "dynamix"
    steps = history["totals"]["steps"]
    dx = history["dynamix"]
    assert [u["step"] for u in dx["updates"]] == list(range(3, steps, 3))  # none after the last step
    assert [ts for *_, ts in looks] == [[0], [1]] * len(dx["updates"])  # each update: one look-ahead per task
    for _, before, after, _ in looks:
        assert np.isfinite(before).all() and np.isfinite(after).all()
        assert np.mean(after) < np.mean(before)  # a real step on those documents: their loss dropped
    for u in dx["updates"]:
        assert sum(u["proportions"].values()) == pytest.approx(1.0)
        assert min(u["proportions"].values()) >= 0.3 / 2 - 1e-12
        assert sorted(u["normalised"].values()) == [0.0, 1.0]
    # The look-ahead's FLOPs are training FLOPs, never kept: train = steps' FLOPs + look-aheads.
    metrics = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    totals = history["totals"]
    assert totals["lookahead_flops"] == sum(f for f, *_ in looks) == sum(u["lookahead_flops"] for u in dx["updates"])
    end = history["evals"][-1]  # the end of training: every step is behind its weights
    assert totals["train_flops"] == metrics[-1]["train_flops"] == end["train_flops"]
    assert end["kept_train_flops"] + totals["lookahead_flops"] == end["train_flops"]
    final = history["evals"][history["final"]["eval_id"]]
    assert totals["final_kept_train_flops"] == final["kept_train_flops"]
    assert totals["final_discarded_train_flops"] >= totals["lookahead_flops"] > 0
    assert len(metrics) == steps and history["stages"][0]["steps_kept"] == steps
    # Steps follow the proportions in force: the last update's mix decides the steps after it.
    assert "dynamix" in compare([whole]) and "undone look-ahead" in open(os.path.join(whole, "report.md")).read()

    # A crash after the update at step 9 was due but before it ran: the checkpoint at step 9 is
    # written inside the step, so the resumed run must run that update first.
    out = str(tmp_path / "crashed")
    _crash_after(monkeypatch, 10)
    with pytest.raises(_Crash):
        train(load_config(None, _overrides(tmp_path, demo_dir, out)))
    monkeypatch.undo()
    newest = latest_checkpoint(out)
    assert read_meta(newest)["steps_trained"] == 9
    assert [u["step"] for u in json.load(open(os.path.join(newest, "history.json")))["dynamix"]["updates"]] == [3, 6]
    train(load_config(None, _overrides(tmp_path, demo_dir, out)))
    _assert_same_run(whole, out)
