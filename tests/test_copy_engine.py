"""The snapshot pool's copy-engine contract, checked on CPU with an engine that copies as late as
the contract allows (as CUDA's side-stream copies may): a capture must still hold the state it was
taken at when the trainer's optimizer step, a spill or a checkpoint comes before the copy ran."""
from __future__ import annotations

import math

import torch
from conftest import demo_tasks

from msft_fast.config import load_config
from msft_fast.state.copy_engine import CopyEngine, SyncCopyEngine, copy_engine_for
from msft_fast.state.snapshot import sharded_params


class LateCopyEngine(CopyEngine):
    """Defers every device-to-host copy to the last moment the contract allows: `before_write()`
    (the compute stream would wait there), `wait()` (the host would), or a `to_device()` (ordered
    after them). Host buffers start as garbage, so reading one too early shows."""

    def __init__(self):
        self.pending = []
        self.copies_late = 0

    def host_buffer(self, like):
        fill = math.nan if like.is_floating_point() else -7
        return torch.full(like.shape, fill, dtype=like.dtype)

    def to_host(self, pairs):
        self.pending += list(pairs)

    def _run_pending(self):
        self.copies_late += len(self.pending)
        with torch.no_grad():
            for dst, src in self.pending:
                dst.copy_(src)
        self.pending.clear()

    before_write = wait = _run_pending

    def to_device(self, pairs):
        self._run_pending()
        SyncCopyEngine().to_device(pairs)


def _state(trainer):
    from msft_fast.state.snapshot import optimizer_tensors

    params = [t.clone() for t in sharded_params(trainer.model)]
    optim = [{k: v.clone() for k, v in d.items()} for d in optimizer_tensors(trainer.model, trainer.optimizer)]
    return params, optim


def _same(a, b) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and len(a[0]) == len(b[0])
            and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a[1], b[1])))


def _run_method(tmp_path, demo_dir, monkeypatch, method):
    from msft_fast import run
    from test_step_loop import _finish

    def wrapped(trainer, history, metric):
        method(trainer)
        return _finish(trainer, history, metric)

    monkeypatch.setitem(run.METHODS, "sft", wrapped)
    tasks = demo_tasks(demo_dir, ("upper", "sort"))
    run.train(load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"data.tasks=[{tasks}]", "data.max_seq_len=64", "data.tokens_per_batch=256",
        f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false", "train.lr=3e-3", "train.epochs=1",
        "train.checkpoint_every=0"]), overwrite=True)


def test_a_capture_copied_late_still_holds_the_state_it_was_taken_at(tmp_path, demo_dir, monkeypatch):
    checked = []

    def method(trainer):
        pool = trainer.make_pool(capacity=2, with_optimizer=True)
        pool.engine = engine = LateCopyEngine()
        for _ in range(2):
            trainer.train_step()  # Adam state exists
        want = _state(trainer)
        snap = trainer.capture()
        assert engine.pending  # nothing copied yet
        for _ in range(3):
            trainer.train_step()  # the first optimizer step runs the pending copies (pool.wait() before it)
        assert engine.copies_late > 0 and not engine.pending
        trainer.restore(snap)
        assert _same(_state(trainer), want)
        # The harness catches a write that does not wait: the late copy then reads the new values.
        other = trainer.capture()
        with torch.no_grad():
            for p in sharded_params(trainer.model):  # this rank's shards, or the parameters of a plain model
                p.add_(1.0)
        engine.wait()
        assert not torch.equal(other.params[0], want[0][0]) and torch.equal(other.params[0], want[0][0] + 1.0)
        checked.append(True)

    _run_method(tmp_path, demo_dir, monkeypatch, method)
    assert checked


def test_spills_and_checkpoints_read_late_copies_only_once_they_are_done(tmp_path, demo_dir, monkeypatch):
    checked = []

    def method(trainer):
        pool = trainer.make_pool(capacity=3, with_optimizer=True, in_memory=1, spill_dir=str(tmp_path / "spill"))
        pool.engine = engine = LateCopyEngine()
        trainer.train_step()
        states, snaps = [], []
        for _ in range(2):
            states.append(_state(trainer))
            snaps.append(trainer.pool.retain(trainer.capture()))  # the second capture spills the first
        assert snaps[0].spilled is not None and engine.pending  # the newest one is still in flight
        saved = pool.state_dict()["snapshots"]  # a checkpoint reads the buffers: after the copies
        assert not engine.pending and _same((saved[1]["params"], saved[1]["optim"]), states[1])
        trainer.train_step()
        for snap, want in zip(snaps, states):
            trainer.restore(snap)
            assert _same(_state(trainer), want)
        checked.append(True)

    _run_method(tmp_path, demo_dir, monkeypatch, method)
    assert checked


def test_cpu_training_copies_at_once_into_plain_buffers():
    """(The CUDA engine, pinned buffers on a side stream, is checked on a GPU by bench/bench_train.py --check.)"""
    engine = copy_engine_for(torch.device("cpu"))
    assert isinstance(engine, SyncCopyEngine) and not engine.pinned
    src, dst = torch.arange(5.0), engine.host_buffer(torch.zeros(5))
    engine.to_host([(dst, src)])
    assert torch.equal(dst, src) and not dst.is_pinned()
