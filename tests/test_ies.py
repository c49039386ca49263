"""IES (instance-dependent early stopping): which documents the rule masters and when, on scripted
losses and against a transcription of the reference code's loop; per-document losses from the
training loss pass itself; mastered documents leave later epochs; a run end to end, and resumed
bitwise after a crash."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import demo_tasks

from msft_fast.config import load_config
from msft_fast.methods.ies import MasteryTracker


def _tracker(losses_per_doc, threshold=1e-3, window=3, k=1):
    """A one-task tracker fed one loss per document per epoch; returns it and each document's
    mastering epoch (-1: never) after every epoch end's decision."""
    n_docs, n_epochs = len(losses_per_doc), max(len(x) for x in losses_per_doc)
    tr = MasteryTracker([n_docs], threshold, window, k)
    for epoch in range(n_epochs):
        trained = [d for d in range(n_docs) if epoch < len(losses_per_doc[d]) and tr.mastered_at[0][d] < 0]
        tr.record(np.zeros(len(trained), np.int64), np.array(trained, np.int64),
                  np.array([losses_per_doc[d][epoch] for d in trained]))
        tr.decide(epoch + 1)
    return tr, tr.mastered_at[0].tolist()


def test_a_document_is_mastered_once_its_second_loss_difference_stays_near_zero():
    linear = [2.0 - 0.2 * i for i in range(8)]  # D = 0 at every epoch: mastered as soon as it may be
    settled = [0.9, 0.6, 0.5, 0.5005, 0.5, 0.5, 0.5, 0.5]  # newest 3 |D|: 0.1005, 0.001, 0.0005 at epoch 6
    swinging = [1.0, 0.5] * 4  # |D| = 1 forever
    late = [0.8, 0.4, 0.3, 0.3, 0.3, 0.3, 0.31, 0.3]  # |D| = 0.01, 0.02 around epoch 7-8: never below 1e-3
    _, at = _tracker([linear, settled, swinging, late])
    # The rule needs window + k + 2 = 6 recorded losses: nothing is mastered before epoch 6.
    assert at == [6, 7, -1, -1]  # settled: 0.001, 0.0005, 0 at epoch 7, mean 0.0005
    # A bump in the loss keeps a document in until the newest window has left it behind: here
    # D = -7, 6.8, 0, 0, ...: epoch 7 is the first whose newest 3 second differences are all 0.
    _, at = _tracker([[9.0, 9.0] + linear])
    assert at == [7]


def test_the_threshold_is_strict_and_window_and_k_are_the_reference_ones():
    # Second differences D = 4 (from the first loss), 0.002, -0.002, 0, 0.
    losses = [5.0, 1.0, 1.0, 1.002, 1.002, 1.002, 1.002]
    tr, at = _tracker([losses], threshold=1e-3, window=3, k=1)
    # At epoch 6 the newest window (0.002, -0.002, 0) has mean |D| 0.00133; at epoch 7 (-0.002, 0, 0) 0.00067.
    assert at == [7]
    assert tr.scores(0)[0] == pytest.approx(0.002 / 3)
    # window=1 looks at the newest |D| alone; k=2 sums the newest two windows.
    _, at = _tracker([[1.0, 1.0, 1.0, 1.0005, 1.0]], threshold=1e-3, window=1, k=2)
    assert at == [-1]  # |D| = 0.0005 + 0.001 = 0.0015 summed over the two newest windows: not below 1e-3
    _, at = _tracker([[1.0, 1.0, 1.0, 1.0, 1.0003]], threshold=1e-3, window=1, k=2)
    assert at == [5]  # 0.0003 + 0.0003 < 1e-3; needs window + k + 2 = 5 losses
    # Exactly at the threshold is not below it.
    _, at = _tracker([[1.0, 1.0, 1.0, 1.0, 1.0 + 2 ** -11]], threshold=2.0 ** -11, window=1, k=2)
    assert at == [-1]  # 0 + 2**-11, exactly
    _, at = _tracker([[1.0, 1.0, 1.0, 1.0, 1.0 + 2 ** -12]], threshold=2.0 ** -11, window=1, k=2)
    assert at == [5]


def test_a_diverged_loss_is_not_recorded():
    tr = MasteryTracker([1], 1e-3, 1, 1)
    tr.record(np.array([0]), np.array([0]), np.array([float("nan")]))
    tr.record(np.array([0]), np.array([0]), np.array([2.0]))
    assert tr.recorded[0][0] == 1 and tr.losses[0][0][-1] == 2.0


def _reference_decisions(losses: np.ndarray, threshold: float, ma: int, k: int) -> np.ndarray:
    """A transcription of the reference loop (tmllab/2025_ICLR_IES cifar_main.py) for instances that
    are trained every epoch until excluded: after each epoch, append the newest second difference of
    every instance with >= 3 losses, trim to the newest ma + k, and exclude instances whose summed
    newest k running means of |D| (window ma) fall below the threshold. Exclusion is kept for good
    here (as in ours), so an excluded instance records no more losses. Returns each instance's
    exclusion epoch (-1: never)."""
    n, epochs = losses.shape
    history = [[] for _ in range(n)]
    derivs = [[] for _ in range(n)]
    out = np.full(n, -1)
    for e in range(epochs):
        for i in range(n):
            if out[i] < 0:
                history[i].append(losses[i, e])
        for i in range(n):
            if out[i] >= 0:
                continue
            x = history[i]
            if len(x) >= 3:
                derivs[i].append(x[-1] - 2 * x[-2] + x[-3])
                derivs[i] = derivs[i][-(ma + k):]
            d = derivs[i]
            if len(d) >= ma + k:
                a = np.abs(d)
                window = sum(a[:ma])
                means = [window / ma]
                for j in range(ma, len(d)):
                    window += a[j] - a[j - ma]
                    means.append(window / ma)
                if np.abs(means[-k:]).sum() < threshold:
                    out[i] = e + 1
    return out


@pytest.mark.parametrize("ma,k,threshold", [(3, 1, 1e-3), (1, 1, 1e-3), (2, 3, 5e-3)])
def test_decisions_match_the_reference_loop_on_random_loss_curves(ma, k, threshold):
    rng = np.random.default_rng(ma * 10 + k)
    n, epochs = 400, 20
    # Decaying curves with per-document noise levels spanning the threshold.
    decay = np.exp(-np.arange(epochs) / rng.uniform(0.5, 3, size=(n, 1)))
    losses = 0.2 + 2 * decay + rng.normal(size=(n, epochs)) * 10 ** rng.uniform(-5, -1.5, size=(n, 1))
    _, ours = _tracker(losses.tolist(), threshold=threshold, window=ma, k=k)
    expected = _reference_decisions(losses, threshold, ma, k)
    assert (expected >= 0).sum() > 40 and (expected < 0).sum() > 40  # both outcomes are exercised
    assert ours == expected.tolist()


def test_the_loader_leaves_dropped_documents_out_of_epochs_planned_after_the_drop(tokenizer, demo_dir, tmp_path):
    from msft_fast.config import DataConfig, TaskConfig
    from msft_fast.data.loader import MixtureLoader
    from msft_fast.data.tasks import load_tasks

    data = DataConfig(tasks=[TaskConfig(n, str(demo_dir / n / "train.jsonl"), str(demo_dir / n / "val.jsonl"))
                             for n in ("upper", "noisy_codes")], max_seq_len=64, tokens_per_batch=256,
                      cache_dir=str(tmp_path / "cache"))
    tasks = load_tasks(data, tokenizer)

    def docs_of(loader, epoch):
        return sorted((int(t), int(d)) for p in loader.epoch_plan(epoch) for t, d in zip(p.tasks, p.docs))

    loader = MixtureLoader(tasks, 256, seed=3, rank=0, world_size=1, grad_accum=2)
    everything = docs_of(loader, 1)
    micro_batches = len(loader.epoch_plan(1))
    assert len(everything) == 180 and len(set(everything)) == 180
    loader.drop_documents(0, [1, 5, 7])
    loader.drop_documents(1, np.arange(80))  # a task with every document mastered contributes nothing
    left = docs_of(loader, 1)
    assert left == [(0, d) for d in range(100) if d not in (1, 5, 7)]
    assert len(loader.epoch_plan(1)) < micro_batches
    # A resumed run gets the same plans from the masks alone.
    again = MixtureLoader(tasks, 256, seed=3, rank=0, world_size=1, grad_accum=2)
    again.set_dropped(loader.dropped)
    assert [(p.tasks.tolist(), p.docs.tolist()) for p in again.epoch_plan(1)] == \
        [(p.tasks.tolist(), p.docs.tolist()) for p in loader.epoch_plan(1)]


def test_per_document_losses_come_from_the_same_loss_pass(tokenizer):
    """Per-document sums of the packed forward equal each document's own loss (float64, plain
    F.cross_entropy on the HF model run on that document alone); the per-task sums and the loss are
    those of the plain pass, which the training step still runs once per micro-batch."""
    from conftest import tiny_llama

    from msft_fast.data.packing import MicroBatchPlan, collate
    from msft_fast.data.tasks import DocSet
    from msft_fast.model import CausalLMWithTaskLoss

    lm = tiny_llama(tokenizer).double()
    lm.config._attn_implementation = "eager"
    rng = np.random.default_rng(0)
    lengths = [7, 3, 12, 5]
    ids = rng.integers(4, len(tokenizer), size=sum(lengths))
    labels = np.where(rng.random(sum(lengths)) < 0.3, -100, np.roll(ids, -1))
    starts = np.cumsum([0] + lengths[:-1])
    for s, n in zip(starts, lengths):
        labels[s + n - 1] = -100  # no document predicts into the next
    docset = DocSet(ids.astype(np.int32), labels.astype(np.int32), starts.astype(np.int64),
                    np.array(lengths, np.int64), np.zeros(4, np.int64))
    batch = collate(MicroBatchPlan(np.zeros(4, np.int64), np.array([2, 0, 3, 1]), sum(lengths)), [docset], [1])
    batch.task_ids = torch.tensor(sum(([t] * lengths[d] for d, t in zip([2, 0, 3, 1], [1, 0, 1, 2])), []))
    model = CausalLMWithTaskLoss(lm, num_tasks=3)
    with torch.no_grad():
        loss, tasks = model(batch)
        loss_d, tasks_d, docs = model(batch, per_document=True)
        for i, d in enumerate([2, 0, 3, 1]):
            s, n = int(starts[d]), lengths[d]
            logits = lm(input_ids=torch.tensor(ids[s:s + n])[None], use_cache=False).logits[0]
            y = torch.tensor(labels[s:s + n]).long()
            own = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
            assert docs.loss_sum[i].item() == pytest.approx(own.item(), rel=1e-6)  # sums are float32
            assert docs.tokens[i].item() == int((y != -100).sum())
    assert loss_d.item() == pytest.approx(loss.item(), rel=1e-12)
    for a, b in zip(tasks, tasks_d):
        assert torch.allclose(a.double(), b.double(), rtol=1e-12)


def _overrides(tmp_path, demo_dir, out, *extra):
    tasks = demo_tasks(demo_dir, ("upper", "noisy_codes"))
    return [f"output_dir={out}", f"data.tasks=[{tasks}]", "data.max_seq_len=64", "data.tokens_per_batch=512",
            f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false", "train.lr=3e-3", "train.epochs=6",
            "train.schedule=constant", "msft.evals_per_epoch=1", "method=ies", "ies.window=1", "ies.threshold=0.05",
            "train.checkpoint_every=4", *extra]


@pytest.mark.slow
def test_ies_end_to_end_leaves_mastered_documents_out_and_resumes_bitwise(tmp_path, demo_dir, monkeypatch):
    """One uninterrupted run (its history fields, decisions and the documents it trained), and one
    that crashes after documents were mastered and resumes to the same history, metrics and weights.
    The per-document losses add no forward pass: the model runs once per trained micro-batch."""
    from test_resume import _assert_same_run, _Crash, _crash_after

    from msft_fast.state.checkpoint import latest_checkpoint, read_meta
    from msft_fast.model import CausalLMWithTaskLoss
    from msft_fast.run import train

    calls = {"train": 0}
    forward = CausalLMWithTaskLoss.forward

    def counted(self, batch, per_document=False):
        if torch.is_grad_enabled():
            calls["train"] += 1
            assert per_document  # IES asks every trained micro-batch for its documents' sums
        return forward(self, batch, per_document)

    trained = {}  # epoch -> (task, doc) of every document trained in it
    from msft_fast.training.trainer import Trainer
    original_step = Trainer.train_step

    def step(self):
        c = self.counters
        trained.setdefault(c.epoch, []).extend(
            (int(t), int(d)) for p in self.loader.step_plans(c.epoch, c.step_in_epoch) for t, d in zip(p.tasks, p.docs))
        original_step(self)

    monkeypatch.setattr(CausalLMWithTaskLoss, "forward", counted)
    monkeypatch.setattr(Trainer, "train_step", step)
    whole = str(tmp_path / "whole")
    history = train(load_config(None, _overrides(tmp_path, demo_dir, whole)))
    monkeypatch.undo()

    assert history["status"] == "finished" and history["method"] == "ies"
    ies = history["ies"]
    assert [d["epoch"] for d in ies["decisions"]] == [1, 2, 3, 4, 5]
    newly = [sum(d["newly_mastered"].values()) for d in ies["decisions"]]
    # window=1, k=1: 4 losses before the first decision can master anything, at the end of epoch 4.
    assert newly[:3] == [0, 0, 0] and newly[3] > 0
    total_mastered = sum(ies["mastered_docs"].values())
    assert total_mastered == sum(newly) and 0 < total_mastered < 180
    # Every epoch trains each remaining document exactly once; a mastered one never comes back.
    remaining = [180] + [sum(d["remaining_docs"].values()) for d in ies["decisions"]]
    assert sorted(trained) == list(range(6))
    for epoch, docs in trained.items():
        assert len(docs) == len(set(docs)) == remaining[epoch]
        if epoch:
            assert set(docs) <= set(trained[epoch - 1])
    metrics = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    assert calls["train"] == len(metrics)  # one forward per trained micro-batch (grad_accum 1, 1 rank)
    # The usual history fields; the remaining tasks stay active while they have documents left.
    assert [e["epoch"] for e in history["evals"]] == pytest.approx([0, 1, 2, 3, 4, 5, 6])
    assert history["stages"][0]["excluded"] is None and history["stages"][0]["steps_kept"] == len(metrics)
    totals = history["totals"]
    assert totals["final_kept_train_flops"] + totals["final_discarded_train_flops"] == totals["train_flops"]
    assert totals["lookahead_flops"] == 0
    final = history["evals"][history["final"]["eval_id"]]
    assert final["pooled_metric"] == min(e["pooled_metric"] for e in history["evals"])

    # A crash after the first masteries (epoch 4 ends at step 32; checkpoints every 4 steps).
    out = str(tmp_path / "crashed")
    _crash_after(monkeypatch, 38)
    with pytest.raises(_Crash):
        train(load_config(None, _overrides(tmp_path, demo_dir, out)))
    monkeypatch.undo()
    newest = latest_checkpoint(out)
    at_crash = json.load(open(os.path.join(newest, "history.json")))["ies"]
    assert read_meta(newest)["steps_trained"] == 36 and sum(at_crash["mastered_docs"].values()) > 0
    train(load_config(None, _overrides(tmp_path, demo_dir, out)))
    _assert_same_run(whole, out)
