"""The step loop on one CPU rank, through the real `train` with a method that drives the trainer:
- the host reads the device once per step (the step's reduction), nowhere else in msft_fast;
- with gradient accumulation every FSDP unit reduces its gradients once per step (train.grad_sync);
- the time split is taken with device marks and logged at the next sync point, never waited for
  inside the step loop (checked with a timer whose marks pass late, as CUDA events do).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from conftest import demo_tasks

from msft_fast.config import load_config
from msft_fast.training.step_audit import GradientReductions, HostSyncAudit
from msft_fast.training.step_timer import PhaseTimer

# Host reads a CPU run makes outside msft_fast during a step, and why none of them is a GPU sync of ours.
KNOWN_ELSEWHERE = {
    "torch/optim/adam.py": "foreach AdamW reads its step counters, which live on the host on a CPU (fused on GPU)",
    "transformers/masking_utils.py": "HF's packed-sequence detection for SDPA (flash-attn and our FlexAttention "
                                     "backend skip it)",
}


def _train_with(tmp_path, demo_dir, monkeypatch, method, *overrides):
    from msft_fast import run

    monkeypatch.setitem(run.METHODS, "sft", method)
    tasks = demo_tasks(demo_dir, ("upper", "sort"))
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"data.tasks=[{tasks}]", "data.max_seq_len=64", "data.tokens_per_batch=256",
        f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false", "train.lr=3e-3", "train.epochs=1",
        "train.checkpoint_every=0", *overrides])
    return run.train(cfg, overwrite=True), cfg


def _finish(trainer, history, metric):
    from msft_fast.methods.records import evaluate
    from msft_fast.methods.sft import final_record

    last = evaluate(trainer, history, metric, stage=0, active=set(trainer.task_names))
    history.add_stage(0, excluded=None, rollback_to_eval=None, start_eval=0, end_eval=last.eval_id)
    return final_record(last)


def test_a_step_reads_the_device_once(tmp_path, demo_dir, monkeypatch):
    per_step = []

    def method(trainer, history, metric):
        trainer.train_step()  # the first step allocates optimizer state: audit the steady state
        for _ in range(3):
            with HostSyncAudit(trainer.ctx.device) as audit:
                trainer.train_step()
            per_step.append(audit.events)
        return _finish(trainer, history, metric)

    _train_with(tmp_path, demo_dir, monkeypatch, method, "train.grad_accum=2")
    for events in per_step:
        # msft_fast/data/ builds the batches from host arrays, before they are copied to the device.
        # The loss gets its label count from the batch (num_valid): no read through kernels/ either.
        assert not [e for e in events if e.came_through("kernels/")], events
        ours = [e for e in events if e.in_files("msft_fast/") and not e.in_files("msft_fast/data/")]
        assert [(e.what, e.stack[-1].rsplit(" in ", 1)[1]) for e in ours] == [("tolist", "read_to_host")], ours
        for e in events:
            assert e in ours or e.in_files("msft_fast/data/") or e.came_through(*KNOWN_ELSEWHERE), \
                f"a new host read at {e.where}"


@pytest.mark.parametrize("grad_sync", ["step", "micro_batch"])
def test_gradients_are_reduced_once_per_step_unless_asked_per_micro_batch(tmp_path, demo_dir, monkeypatch, grad_sync):
    seen = {}

    def method(trainer, history, metric):
        seen["units"] = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
        seen["per_step"] = []
        for _ in range(3):
            with GradientReductions() as counted:
                trainer.train_step()
            seen["per_step"].append(counted.units)
        return _finish(trainer, history, metric)

    # One CPU rank in fp32 trains without FSDP2 unless asked (train.fsdp): here FSDP2's reductions are the subject.
    _train_with(tmp_path, demo_dir, monkeypatch, method, "train.grad_accum=3", f"train.grad_sync={grad_sync}",
                "train.fsdp=always")
    units, micro_batches = seen["units"], 3
    assert units == 4  # three blocks of the built-in model and the root
    assert seen["per_step"] == [units if grad_sync == "step" else units * micro_batches] * 3


def test_both_grad_sync_modes_train_alike(tmp_path, demo_dir, monkeypatch):
    """Reducing once per step or after every micro-batch sums the same gradients (one rank: same order)."""
    runs = {}
    for mode in ("step", "micro_batch"):
        def method(trainer, history, metric, mode=mode):
            runs[mode] = []
            for _ in range(4):
                trainer.train_step()
            trainer.evaluate()  # a sync point: the step records are written
            with open(trainer.metrics_path) as f:
                runs[mode] = [(r["loss"], r["grad_norm"]) for r in map(json.loads, f)]
            return _finish(trainer, history, metric)

        _train_with(tmp_path / mode, demo_dir, monkeypatch, method, "train.grad_accum=3", f"train.grad_sync={mode}",
                    "train.fsdp=always")
    assert len(runs["step"]) == 4
    for (la, ga), (lb, gb) in zip(runs["step"], runs["micro_batch"]):
        assert la == pytest.approx(lb, rel=1e-6) and ga == pytest.approx(gb, rel=1e-5)


class LateTimer(PhaseTimer):
    """A device-like timer: its marks pass only when `LateTimer.passed` says so (as CUDA events pass
    when the device gets there); waiting for it is counted."""

    passed = False
    waits = 0

    def __init__(self):
        super().__init__()
        self.stamps = []

    def _record(self):
        self.stamps.append(len(self.stamps) * 0.25)

    def ready(self):
        return LateTimer.passed

    def wait(self):
        if not LateTimer.passed:
            LateTimer.waits += 1
        LateTimer.passed = True

    def seconds(self):
        assert LateTimer.passed, "read before its marks passed"
        return {n: b - a for n, a, b in zip(self.names, self.stamps, self.stamps[1:])}


def test_step_times_are_logged_at_the_next_sync_point_without_waiting(tmp_path, demo_dir, monkeypatch):
    def late_start(device):
        timer = LateTimer()
        timer._record()
        return timer

    monkeypatch.setattr(PhaseTimer, "start", staticmethod(late_start))
    LateTimer.passed, LateTimer.waits = False, 0
    lines = []

    def logged(trainer):
        path = trainer.metrics_path
        return [json.loads(x) for x in open(path)] if os.path.exists(path) else []

    def method(trainer, history, metric):
        for _ in range(3):
            trainer.train_step()
            lines.append(len(logged(trainer)))
        # The marks have not passed: nothing was logged, and the step loop never waited for them.
        assert LateTimer.waits == 0
        LateTimer.passed = True  # the device caught up
        trainer.train_step()  # its sync point logs the three earlier steps, not its own
        lines.append(len(logged(trainer)))
        LateTimer.passed = False
        trainer.save_checkpoint()  # a checkpoint waits: metrics.jsonl must hold every step before it
        lines.append(len(logged(trainer)))
        assert LateTimer.waits == 1
        return _finish(trainer, history, metric)

    _train_with(tmp_path, demo_dir, monkeypatch, method)
    assert lines == [0, 0, 0, 3, 4]
    records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["time"] == {"data": 0.25, "fwd_bwd": 0.25, "optimizer": 0.25} and r["step_seconds"] == 0.75
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / 0.75) and r["host_seconds"] > 0


def test_host_timer_splits_a_step_into_its_phases():
    t = PhaseTimer.start(torch.device("cpu"))
    t.mark("data")
    t.mark("fwd_bwd")
    assert t.ready() and list(t.seconds()) == ["data", "fwd_bwd"] and min(t.seconds().values()) >= 0


def test_on_cuda_the_audit_records_each_sync_warning_with_its_call_site(monkeypatch):
    """The CUDA path of HostSyncAudit, on a CPU: PyTorch's sync debug mode is stubbed, and a
    synchronising call is stood in for by the warning it makes."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def reads_the_device():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    with warnings.catch_warnings(record=True) as passed_on:
        warnings.simplefilter("always")
        with HostSyncAudit(torch.device("cuda", 0)) as audit:
            reads_the_device()
            reads_the_device()
            warnings.warn("an unrelated warning")
    assert modes == ["warn", 0]  # on, then back to what it was
    assert [e.stack[-1].rsplit(" in ", 1)[1] for e in audit.events] == ["reads_the_device"] * 2
    assert all(e.in_files("tests/test_step_loop.py") for e in audit.events)
    assert [str(w.message) for w in passed_on] == ["an unrelated warning"]


def test_static_shapes_pad_every_micro_batch_and_change_no_result(tmp_path, demo_dir, monkeypatch):
    """data.static_shapes=true: every micro-batch the model runs (training and evaluation) has the
    static length, history.json says so, padding is counted against that length, and training
    gives the run without it, up to float rounding (the filler has no label and attends only to
    itself)."""
    import torch

    from msft_fast.model import CausalLMWithTaskLoss

    seen = []
    real_forward = CausalLMWithTaskLoss.forward

    def forward(self, batch, per_document=False):
        seen.append(batch.num_tokens)
        return real_forward(self, batch, per_document)

    monkeypatch.setattr(CausalLMWithTaskLoss, "forward", forward)

    def method(trainer, history, metric):
        for _ in range(4):
            trainer.train_step()
        return _finish(trainer, history, metric)

    results = {}
    for setting in ("true", "false"):
        seen.clear()
        _train_with(tmp_path / setting, demo_dir, monkeypatch, method, "data.tokens_per_batch=250",
                    f"data.static_shapes={setting}")
        with open(tmp_path / setting / "run" / "history.json") as f:
            results[setting] = json.load(f), list(seen)
    (on, on_seen), (off, off_seen) = results["true"], results["false"]
    assert set(on_seen) == {256} and on["static_tokens"] == 256
    assert len(set(off_seen)) > 1 and max(off_seen) <= 250 and off["static_tokens"] is None
    assert on["packing"]["padding"] > off["packing"]["padding"]
    assert on["packing"]["padding"] == pytest.approx(1 - (1 - off["packing"]["padding"]) * 250 / 256, abs=1e-6)
    for a, b in zip(on["evals"], off["evals"]):
        for task in on["tasks"]:
            assert a["tasks"][task]["val_loss"] == pytest.approx(b["tasks"][task]["val_loss"], rel=1e-4)
    assert on["totals"]["trained_tokens"] == off["totals"]["trained_tokens"]
    assert on["totals"]["train_flops"] == off["totals"]["train_flops"]  # the filler is not useful work
