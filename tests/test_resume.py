"""Checkpoints, resume and faults: an interrupted run continues exactly as if it had not stopped
(CPU, fp32: bitwise), a stop signal writes a checkpoint first, a failed checkpoint write leaves the
previous one usable, half-written checkpoints are skipped by name, another number of ranks is
refused, and non-finite steps are skipped, counted and acted on. SIGKILLs at every fault point, and
a soak of random ones, are in test_kill_points.py."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

import forked_cli
from conftest import demo_tasks, kill_process_tree

from msft_fast.state.checkpoint import complete_checkpoints, latest_checkpoint, read_meta
from msft_fast.config import load_config
from msft_fast.runtime.fault_injection import KILL_AT_ENV
from msft_fast.training.trainer import Trainer

RESUMED = re.compile(r"resuming the unfinished run in (\S+) from (\S+) \(step (\d+)\)")
TIMING_KEYS = {"train_seconds", "eval_seconds", "snapshot_seconds", "restore_seconds", "checkpoint_seconds",
               "spill_seconds", "wall_seconds", "seconds", "host_available", "tokens_per_s", "step_seconds",
               "tokens_per_s_per_device", "time", "peak_mem_gib", "mfu", "host_seconds"}


def _overrides(tmp_path, demo_dir, out, *extra):
    tasks = demo_tasks(demo_dir, ("upper", "noisy_codes", "sort"))
    return [f"output_dir={out}", f"data.tasks=[{tasks}]", "data.max_seq_len=64", "data.tokens_per_batch=512",
            # lr 6e-3: two tasks overfit within the budget, so mSFT runs roll back twice
            f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false", "train.lr=6e-3", "train.epochs=1",
            "train.schedule=constant", "msft.evals_per_epoch=4", "msft.budget_epochs=0.5", "msft.max_stages=3",
            "train.checkpoint_every=3", "train.keep_checkpoints=2", *extra]


def _train(tmp_path, demo_dir, out, *extra):
    from msft_fast.run import train

    return train(load_config(None, _overrides(tmp_path, demo_dir, out, *extra)))


def _strip(obj):
    """history / metrics without what differs between runs by nature (timings, free memory)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _outputs(out):
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    weights = load_file(os.path.join(out, "final", "model.safetensors"))
    return _strip(history), _strip(metrics), weights


def _assert_same_run(a, b, ignore=()) -> int:
    """Runs a and b ended the same: history (bar `ignore` and settings that may differ), metrics,
    final weights, and the model and optimizer state of every checkpoint step both hold (read back
    with DCP). Returns how many checkpoints were compared."""
    (ha, ma, wa), (hb, mb, wb) = _outputs(a), _outputs(b)
    # Settings that may differ: where each run wrote, how often it checkpointed; and `ignore`.
    for h in (ha, hb):
        for key in ("config.output_dir", "config.data.cache_dir", "config.train.checkpoint_every",
                    "config.train.checkpoint_async", *ignore):
            *path, name = key.split(".")
            node = h
            for part in path:
                node = node[part]
            node.pop(name)
    assert json.dumps(ha, sort_keys=True) == json.dumps(hb, sort_keys=True)  # NaN-safe, bitwise floats
    assert json.dumps(ma) == json.dumps(mb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    steps_a = {read_meta(p)["steps_trained"]: p for p in complete_checkpoints(a)}
    steps_b = {read_meta(p)["steps_trained"]: p for p in complete_checkpoints(b)}
    common = sorted(set(steps_a) & set(steps_b))
    with tempfile.TemporaryDirectory() as tmp:
        for step in common:
            _assert_same_contents(_checkpoint_contents(steps_a[step], os.path.join(tmp, "a.pt")),
                                  _checkpoint_contents(steps_b[step], os.path.join(tmp, "b.pt")), f"step {step}")
    return len(common)


def _checkpoint_contents(folder, into) -> dict:
    """Model and optimizer state of a DCP checkpoint folder, read back in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, into)
    return torch.load(into, weights_only=False)


def _assert_same_contents(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_contents(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_contents(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


class _Crash(BaseException):
    """Stands in for a kill: nothing in the trainer catches it, only `finally` blocks run."""


def _crash_after(monkeypatch, steps_trained: int):
    original = Trainer._after_step

    def after_step(self, finite, stop):
        original(self, finite, stop)
        if self.counters.steps_trained == steps_trained:
            raise _Crash()

    monkeypatch.setattr(Trainer, "_after_step", after_step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_dir):
    """One uninterrupted run per method, shared by the resume tests."""
    base = tmp_path_factory.mktemp("whole")
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = str(base / method)
            _train(base, demo_dir, runs[method], f"method={method}")
        return runs[method]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("method,crash_at,options", [
    pytest.param("msft", 20, ("train.checkpoint_async=true",), marks=pytest.mark.stack), ("sft", 8, ()), ("sro", 25, ()),
])
def test_a_crashed_run_resumes_to_the_same_history_and_weights(tmp_path, demo_dir, uninterrupted, monkeypatch,
                                                               caplog, method, crash_at, options):
    whole = uninterrupted(method)
    out = str(tmp_path / "run")
    _crash_after(monkeypatch, crash_at)
    with pytest.raises(_Crash):
        _train(tmp_path, demo_dir, out, f"method={method}", *options)
    monkeypatch.undo()
    with open(os.path.join(out, "history.json")) as f:
        assert json.load(f)["status"] == "running"
    newest = latest_checkpoint(out)
    # An asynchronous checkpoint completes when the next one starts: a crash loses the newest.
    expect = crash_at - crash_at % 3 - (3 if options else 0)
    assert read_meta(newest)["steps_trained"] == expect
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        history = _train(tmp_path, demo_dir, out, f"method={method}", *options)
    assert RESUMED.findall(caplog.text) == [(out, newest, str(expect))]
    assert history["status"] == "finished"
    assert _assert_same_run(whole, out) == 2  # the two kept checkpoints, the last step's included
    assert len(complete_checkpoints(out)) == 2  # train.keep_checkpoints
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.endswith(".tmp")]


def test_resuming_with_another_config_is_refused_and_names_the_key(tmp_path, demo_dir, monkeypatch, capsys):
    from msft_fast.cli import main

    out = str(tmp_path / "run")
    _crash_after(monkeypatch, 3)
    with pytest.raises(_Crash):
        _train(tmp_path, demo_dir, out, "method=sft")
    monkeypatch.undo()
    assert main(["train", *_overrides(tmp_path, demo_dir, out, "method=sft", "train.lr=1e-3")]) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "'train.lr'" in err and "Traceback" not in err


def test_resuming_on_other_data_is_refused_and_names_the_task(tmp_path, demo_dir, monkeypatch, capsys, caplog):
    """config.yaml names files, not their contents: a train file edited in place (or another tokenizer or
    chat template) would change what the resumed steps train on. The tokenized documents' digests in
    the checkpoint are compared; the refusal loses nothing, and the restored file resumes."""
    import shutil

    from msft_fast.cli import main

    data, out = tmp_path / "data", str(tmp_path / "run")
    shutil.copytree(demo_dir, data)
    _crash_after(monkeypatch, 3)
    with pytest.raises(_Crash):
        _train(tmp_path, data, out, "method=sft")
    monkeypatch.undo()
    newest = latest_checkpoint(out)
    train_file = data / "sort" / "train.jsonl"
    original = train_file.read_text()
    rows = original.splitlines(keepends=True)
    row = json.loads(rows[7])
    row["completion"] = row["completion"] + " x"  # one answer changed by one token's worth
    train_file.write_text("".join(rows[:7] + [json.dumps(row) + "\n"] + rows[8:]))
    assert main(["train", *_overrides(tmp_path, data, out, "method=sft")]) == 2
    err = capsys.readouterr().err
    assert "train documents of task 'sort' differ" in err and "Traceback" not in err, err
    assert latest_checkpoint(out) == newest
    train_file.write_text(original)
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        assert main(["train", *_overrides(tmp_path, data, out, "method=sft")]) == 0
    assert RESUMED.findall(caplog.text) == [(out, newest, "3")]


def test_half_written_checkpoints_are_skipped_and_named_in_the_log(tmp_path, caplog):
    """What a crash leaves behind (step-N.tmp: a write that did not finish; step-N without meta.json:
    a deletion that did not finish) is never taken for the newest checkpoint, and the log names it."""
    root = tmp_path / "checkpoints"
    for name in ("step-00000003", "step-00000006", "step-00000009.tmp"):
        (root / name).mkdir(parents=True)
    (root / "step-00000003" / "meta.json").write_text("{}")
    (root / "step-00000009.tmp" / "meta.json").write_text("{}")  # meta.json is written before the rename
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        assert latest_checkpoint(str(tmp_path)) == str(root / "step-00000003")
    assert f"ignoring the incomplete checkpoint {root / 'step-00000006'} (it has no meta.json)" in caplog.text
    assert f"ignoring the incomplete checkpoint {root / 'step-00000009.tmp'} (its write did not finish)" in caplog.text


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_training_goes_on(tmp_path, demo_dir, monkeypatch,
                                                                               caplog):
    import msft_fast.state.checkpoint as ckpt

    real_save, calls = ckpt.dcp.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt.dcp, "save", save)
    out = str(tmp_path / "run")
    _crash_after(monkeypatch, 7)
    with caplog.at_level(logging.ERROR, logger="msft_fast"), pytest.raises(_Crash):
        _train(tmp_path, demo_dir, out, "method=sft", "train.epochs=0.5")
    assert "No space left on device" in caplog.text and "step-00000003" in caplog.text
    # Step 6's checkpoint failed: step 3's is the newest, complete and loadable; no partial folder.
    assert [read_meta(p)["steps_trained"] for p in complete_checkpoints(out)] == [3]
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-00000003"]
    monkeypatch.undo()
    assert _train(tmp_path, demo_dir, out, "method=sft", "train.epochs=0.5")["status"] == "finished"


@pytest.mark.slow
def test_snapshots_spilled_to_disk_give_the_same_run(tmp_path, demo_dir, uninterrupted, monkeypatch):
    """Host memory for two of the pool's four states: the others go to disk, the run is the same."""
    import msft_fast.state.snapshot as snapshot

    whole = uninterrupted("msft")
    with open(os.path.join(whole, "history.json")) as f:
        per_state = json.load(f)["snapshot_pool"]["bytes_per_state"]
    monkeypatch.setattr(snapshot, "host_memory_available", lambda: int(2.5 * per_state / 0.8))
    out, spill = str(tmp_path / "run"), tmp_path / "spill"
    history = _train(tmp_path, demo_dir, out, "method=msft", f"msft.snapshot_spill_dir={spill}")
    assert history["snapshot_pool"]["in_memory_states"] == 2 and history["totals"]["snapshot_spills"] > 0
    assert not any(files for _, _, files in os.walk(spill))  # spilled files are removed with their states
    _assert_same_run(whole, out, ignore=("snapshot_pool", "totals.snapshot_spills", "config.msft.snapshot_spill_dir"))


# ---------------------------------------------------------------------------------------------
# Non-finite steps


def _poison_steps(monkeypatch, steps: set[int]):
    """Make the loss (and so the gradients) NaN in the given optimizer steps (1 micro-batch each)."""
    from msft_fast.model import CausalLMWithTaskLoss

    original, calls = CausalLMWithTaskLoss.forward, [0]

    def forward(self, batch):
        loss, stats = original(self, batch)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] in steps:
                return loss * math.nan, stats._replace(loss_sum=stats.loss_sum * math.nan)
        return loss, stats

    monkeypatch.setattr(CausalLMWithTaskLoss, "forward", forward)


def _count_optimizer_steps(monkeypatch):
    calls = [0]
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


def test_non_finite_steps_are_skipped_and_counted(tmp_path, demo_dir, monkeypatch):
    _poison_steps(monkeypatch, {4, 5})
    updates = _count_optimizer_steps(monkeypatch)
    history = _train(tmp_path, demo_dir, str(tmp_path / "run"), "method=sft", "train.max_bad_steps=3",
                     "train.epochs=0.5")
    totals = history["totals"]
    assert totals["bad_steps"] == 2 and totals["bad_restores"] == 0
    assert updates[0] == totals["steps"] - 2
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        skipped = [r["step"] for r in map(json.loads, f) if r.get("skipped")]
    assert skipped == [4, 5]
    assert all(math.isfinite(e["pooled_val_loss"]) for e in history["evals"])


def test_too_many_non_finite_steps_stop_the_run_with_a_clear_message(tmp_path, demo_dir, monkeypatch, capsys):
    from msft_fast.cli import main

    _poison_steps(monkeypatch, {4, 5, 6})
    out = tmp_path / "run"
    assert main(["train", *_overrides(tmp_path, demo_dir, out, "method=sft", "train.max_bad_steps=3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 optimizer steps in a row" in err[0] and "train.lr" in err[0]
    assert json.loads((out / "history.json").read_text())["status"] != "finished"
    assert not (out / "final").exists()


def test_non_finite_steps_can_restore_the_newest_checkpoint_and_go_on(tmp_path, demo_dir, monkeypatch):
    _poison_steps(monkeypatch, {7, 8})
    history = _train(tmp_path, demo_dir, str(tmp_path / "run"), "method=sft", "train.max_bad_steps=2",
                     "train.on_bad_steps=restore", "train.epochs=0.5")
    assert history["status"] == "finished"
    assert history["totals"]["bad_steps"] == 2 and history["totals"]["bad_restores"] == 1


# ---------------------------------------------------------------------------------------------
# Real signals in subprocesses


def _cli(config_overrides, tmp_path, launcher=()):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "msft_fast.train"] if launcher else [sys.executable, "-m", "msft_fast", "train"]
    return subprocess.Popen([*cmd, *config_overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def _wait_for_steps(proc, out, steps: int, timeout: float = 240):
    """Until metrics.jsonl has `steps` lines; `proc` is a subprocess.Popen or a forked_cli process."""
    path, t0 = os.path.join(out, "metrics.jsonl"), time.time()
    while time.time() - t0 < timeout:
        if (proc.poll() is not None) if hasattr(proc, "poll") else not proc.is_alive():
            raise AssertionError("the run ended early")
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= steps:
                    return
        time.sleep(0.05)
    raise AssertionError("the run did not reach the step in time")


def _finish(proc, timeout: float = 300):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        proc.communicate()
        raise
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops_then_the_rerun_finishes_the_same(tmp_path, demo_dir, uninterrupted):
    whole = uninterrupted("msft")
    out = str(tmp_path / "run")
    argv = ["train", *_overrides(tmp_path, demo_dir, out, "method=msft")]
    proc = forked_cli.start(argv, tmp_path / "stopped.log")
    _wait_for_steps(proc, out, 5)
    os.kill(proc.pid, signal.SIGTERM)
    stopped = forked_cli.wait(proc, tmp_path / "stopped.log")
    assert stopped.exitcode == 143, stopped.log[-2000:]
    err = stopped.log
    assert "stopped by SIGTERM" in err and "rerun the same command to resume" in err and "Traceback" not in err
    newest = latest_checkpoint(out)
    stopped_at = read_meta(newest)["steps_trained"]
    assert stopped_at >= 5  # written at the step the signal arrived in, not only every 3 steps
    with open(os.path.join(out, "history.json")) as f:
        assert json.load(f)["status"] == "stopped"
    rerun = forked_cli.run(argv, tmp_path / "rerun.log")
    assert rerun.exitcode == 0, rerun.log[-2000:]
    assert RESUMED.findall(rerun.log) == [(out, newest, str(stopped_at))]
    _assert_same_run(whole, out)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "msft-fast: error:" in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_killed_and_rerun_end_like_two_ranks_uninterrupted(tmp_path, demo_dir):
    whole, out = str(tmp_path / "whole"), str(tmp_path / "run")
    common = ("method=msft", "train.grad_accum=1", "msft.max_stages=2")
    code, err = _finish(_cli(_overrides(tmp_path, demo_dir, whole, *common), tmp_path, TORCHRUN))
    assert code == 0, err[-2000:]
    args = _overrides(tmp_path, demo_dir, out, *common, "train.checkpoint_every=2")
    proc = _cli(args, tmp_path, TORCHRUN)
    _wait_for_steps(proc, out, 5)
    kill_process_tree(proc.pid)
    proc.communicate()
    newest = latest_checkpoint(out)
    steps = read_meta(newest)["steps_trained"]
    with open(os.path.join(out, "history.json")) as f:
        assert json.load(f)["status"] == "running"  # really killed mid-run
    # One rank cannot resume it (snapshot states are per-rank shards): one line, exit 2, nothing changed.
    one = forked_cli.run(["train", *args], tmp_path / "one-rank.log")
    assert one.exitcode == 2 and "Traceback" not in one.log, one.log[-3000:]
    line = _one_error_line(one.log)
    assert f"checkpoint {newest} was written by 2 ranks and this run has 1 rank" in line
    assert latest_checkpoint(out) == newest
    code, err = _finish(_cli(args, tmp_path, TORCHRUN))
    assert code == 0, err[-2000:]
    assert RESUMED.findall(err) == [(out, newest, str(steps))]
    _assert_same_run(whole, out)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_one_rank_checkpoint_is_refused_on_two_ranks_in_one_line(tmp_path, demo_dir):
    out = str(tmp_path / "run")
    args = _overrides(tmp_path, demo_dir, out, "method=sft", "train.epochs=0.5")
    killed = forked_cli.run(["train", *args], tmp_path / "killed.log", {KILL_AT_ENV: "train_step:4"})
    assert killed.exitcode == -9, killed.log[-3000:]
    newest = latest_checkpoint(out)
    assert read_meta(newest)["steps_trained"] == 3
    code, err = _finish(_cli(args, tmp_path, TORCHRUN))
    assert code != 0
    line = _one_error_line(err)  # printed once, by rank 0, though both ranks stop on it
    assert f"checkpoint {newest} was written by 1 rank and this run has 2 ranks: resume it with 1 rank" in line
    assert "--overwrite" in line
    assert latest_checkpoint(out) == newest
