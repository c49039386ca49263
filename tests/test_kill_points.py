"""SIGKILL at named points of an mSFT run (mid-step, mid-evaluation, mid-snapshot capture and restore,
mid-checkpoint write and deletion, mid-export), then the same command again. The rerun must say
which complete checkpoint it resumes from, name and skip what the kill left half-written, do exactly
the work an uninterrupted run did after that checkpoint, and end bitwise equal to it.

The kills come from msft_fast/runtime/fault_injection.py. An uninterrupted run records the sequence of
fault points it passes (its trace); a kill is planned as an index into that trace, and every process
records its own trace, which must be the uninterrupted one from where it resumed to where it died.
The runs are real processes (tests/forked_cli.py) on the compact demo's upper/noisy_codes/sort tasks.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
from conftest import kill_process_tree

import forked_cli
from msft_fast.state.checkpoint import complete_checkpoints, incomplete_checkpoints, read_meta
from msft_fast.runtime.fault_injection import KILL_AT_ENV, POINTS, TRACE_ENV
from test_resume import _assert_same_contents, _assert_same_run, _checkpoint_contents, _overrides

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

EVERY = 3  # train.checkpoint_every in _overrides
# A decaying lr after a warm-up, so that a resume that loses the schedule's position shows.
SETTINGS = ("method=msft", "train.schedule=cosine", "train.warmup_steps=2")
RESUMED = re.compile(r"resuming the unfinished run in (\S+) from (\S+) \(step (\d+)\)")
IGNORED = re.compile(r"ignoring the incomplete checkpoint (\S+) \((.+)\)")
# One kill at each point, in the order the chain meets them.
CHAIN = ("train_step", "evaluate", "snapshot_capture", "checkpoint_write", "checkpoint_prune", "snapshot_restore",
         "export")


def _read_trace(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().split()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir):
    """An uninterrupted mSFT run and its trace of fault points."""
    base = tmp_path_factory.mktemp("kill_points")
    out, trace = base / "whole", base / "whole.trace"
    done = forked_cli.run(["train", *_overrides(base, demo_dir, out, *SETTINGS)], base / "whole.log",
                          {TRACE_ENV: str(trace)})
    assert done.exitcode == 0, done.log[-3000:]
    points = _read_trace(trace)
    assert set(points) == set(POINTS), "the reference run passes every fault point"
    return base, str(out), points


def resume_index(trace: list[str], steps: int) -> int:
    """Where in the uninterrupted trace a run resumed from the checkpoint of step `steps` carries on:
    after that checkpoint's write and the deletions that completed it."""
    assert steps % EVERY == 0, f"checkpoints are written every {EVERY} steps, not at step {steps}"
    i = [i for i, name in enumerate(trace) if name == "checkpoint_write"][steps // EVERY - 1] + 1
    while i < len(trace) and trace[i] == "checkpoint_prune":
        i += 1
    return i


class KilledAndRerun:
    """One output folder, run again and again with the same command, each time killed at a planned
    point of the uninterrupted trace (or left to finish), checking every resumption."""

    def __init__(self, base, demo_dir, name: str, trace: list[str]):
        self.dir = base / name
        self.dir.mkdir()
        self.out = str(self.dir / "run")
        self.argv = ["train", *_overrides(base, demo_dir, self.out, *SETTINGS)]
        self.trace = trace
        self.start = 0  # index into the trace where the next process begins its work
        # When the last kill happened: {complete checkpoint folder: its step}, [(incomplete folder, why)]
        self.at_kill = None
        self.runs = 0

    def run(self, kill_index=None) -> None:
        """Run once more; SIGKILL it at trace[kill_index] (counted from where it begins), or let it end."""
        self.runs += 1
        log, trace_file = self.dir / f"{self.runs}.log", self.dir / f"{self.runs}.trace"
        env = {TRACE_ENV: str(trace_file)}
        what = "to the end"
        if kill_index is not None:
            point = self.trace[kill_index]
            count = self.trace[self.start : kill_index + 1].count(point)
            env[KILL_AT_ENV] = what = f"{point}:{count}"
        done = forked_cli.run(self.argv, log, env)
        context = f"run {self.runs} ({what})"
        self._check_resumption(done.log, context)
        end = len(self.trace) if kill_index is None else kill_index + 1
        # It did the uninterrupted run's work from where it resumed, no more and no less.
        assert _read_trace(trace_file) == self.trace[self.start : end], context
        if kill_index is None:
            assert done.exitcode == 0, f"{context}: {done.log[-3000:]}"
            self.at_kill = None
            return
        assert done.exitcode == -9, f"{context} was not killed (exit {done.exitcode}): {done.log[-3000:]}"
        complete = {path: read_meta(path)["steps_trained"] for path in complete_checkpoints(self.out)}
        assert complete, f"{context}: the kill came before any complete checkpoint"
        self.at_kill = (complete, incomplete_checkpoints(self.out))
        self.start = resume_index(self.trace, list(complete.values())[-1])  # where the rerun must carry on

    def _check_resumption(self, log: str, context: str) -> None:
        resumed = RESUMED.findall(log)
        if self.at_kill is None:  # a fresh run
            assert not resumed, f"{context}: {resumed}"
            return
        complete, incomplete = self.at_kill
        assert len(resumed) == 1, f"{context} did not log its resumption: {log[-3000:]}"
        out, folder, steps = resumed[0]
        assert out == self.out
        # The newest checkpoint that was complete when the kill happened, named, at its step.
        newest = list(complete)[-1]
        assert folder == newest, f"{context} resumed from {folder}, not {newest}"
        assert complete[folder] == int(steps), context
        # What the kill left half-written is named and skipped.
        assert sorted(IGNORED.findall(log)) == sorted(incomplete), context


def test_a_kill_at_each_point_then_a_rerun_resumes_from_a_named_checkpoint_and_ends_the_same(reference, demo_dir):
    base, whole, trace = reference
    assert set(CHAIN) == set(POINTS)  # a new fault point needs a kill here
    runs = KilledAndRerun(base, demo_dir, "chain", trace)
    previous = trace.index("checkpoint_write")  # the first kill comes after the first checkpoint
    for point in CHAIN:
        index = next((i for i in range(previous + 1, len(trace)) if trace[i] == point), None)
        assert index is not None, f"no {point} after trace index {previous}: {trace}"
        runs.run(index)
        complete, incomplete = runs.at_kill
        if point == "checkpoint_write":  # a write cut short leaves step-N.tmp
            assert [why for _, why in incomplete] == ["its write did not finish"]
        if point == "checkpoint_prune":  # a deletion cut short leaves step-N without meta.json
            assert [why for _, why in incomplete] == ["it has no meta.json"]
        if point == "export":
            assert os.path.isdir(os.path.join(runs.out, "final.tmp"))
            assert not os.path.exists(os.path.join(runs.out, "final"))
        previous = index
    runs.run()
    _assert_same_run(whole, runs.out)
    assert not os.path.exists(os.path.join(runs.out, "final.tmp"))
    assert not incomplete_checkpoints(runs.out)  # removed once a later checkpoint was complete


def test_soak_three_random_kills_and_reruns_end_like_an_uninterrupted_run(reference, demo_dir):
    """Seeded by MSFT_FAST_SOAK_SEED (default 0; .ci/run sets a new one for each CI run and prints
    it, and so does this test): one kill at a random point of each third of the run that follows the
    first checkpoint. A failure replays with the seed it names."""
    base, whole, trace = reference
    seed = int(os.environ.get("MSFT_FAST_SOAK_SEED", "0"))
    print(f"soak seed: MSFT_FAST_SOAK_SEED={seed}")
    rng = random.Random(seed)
    first = trace.index("checkpoint_write") + 1
    span = (len(trace) - first) / 3
    kills = [rng.randrange(first + int(i * span), first + int((i + 1) * span)) for i in range(3)]
    runs = KilledAndRerun(base, demo_dir, f"soak-{seed}", trace)
    try:
        for index in kills:
            runs.run(index)
        runs.run()
        _assert_same_run(whole, runs.out)
    except AssertionError as e:
        raise AssertionError(f"soak with MSFT_FAST_SOAK_SEED={seed} (kills at trace indices {kills}): {e}") from e


# ---------------------------------------------------------------------------------------------
# Two ranks, asynchronous checkpoints

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ASYNC = (*SETTINGS, "train.checkpoint_async=true", "train.grad_accum=1")


def _torchrun(base, demo_dir, out, name: str, env: dict, *extra) -> tuple[int, str]:
    """`torchrun -m msft_fast.train` on 2 gloo ranks; (exit code, stderr)."""
    proc = subprocess.Popen([*TORCHRUN, "-m", "msft_fast.train", *_overrides(base, demo_dir, out, *ASYNC, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(base), "OMP_NUM_THREADS": "1", **env})
    try:
        _, err = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        proc.communicate()
        raise
    (base / f"{name}.log").write_text(err)
    return proc.returncode, err


def test_two_ranks_with_async_checkpoints_killed_mid_write_and_after_an_exclusion(tmp_path, demo_dir):
    """2 gloo ranks, asynchronous checkpoints, every checkpoint kept in an uninterrupted reference.
    Killed (both ranks, SIGKILL) while the second checkpoint's shards are still being written, then
    rerun; killed again at the first step after mSFT's first roll-back, then rerun to the end. After
    each kill the newest complete checkpoint holds exactly the reference's model and Adam state at
    its step (read with DCP), the rerun names what it resumes from and skips the half-written
    checkpoint, and the run ends equal to the reference, its last checkpoint included."""
    base = tmp_path
    whole, out = str(base / "whole"), str(base / "run")
    code, err = _torchrun(base, demo_dir, whole, "whole", {TRACE_ENV: str(base / "whole-{rank}.trace")},
                          "train.keep_checkpoints=1000")
    assert code == 0, err[-3000:]
    trace = _read_trace(base / "whole-0.trace")
    # Both ranks pass the same points (rank 0 alone writes final/).
    assert _read_trace(base / "whole-1.trace") == [p for p in trace if p != "export"]
    history = json.load(open(os.path.join(whole, "history.json")))
    assert any(s["excluded"] for s in history["stages"]), "the reference must roll back"
    reference = {read_meta(p)["steps_trained"]: p for p in complete_checkpoints(whole)}

    def check_newest(context: str) -> int:
        newest = complete_checkpoints(out)[-1]
        steps = read_meta(newest)["steps_trained"]
        assert steps in reference, f"{context}: no reference checkpoint at step {steps}"
        _assert_same_contents(_checkpoint_contents(newest, base / "got.pt"),
                              _checkpoint_contents(reference[steps], base / "want.pt"), context)
        return steps

    # 1: during the second checkpoint's asynchronous write (the first is complete by then).
    code, _ = _torchrun(base, demo_dir, out, "kill-1", {KILL_AT_ENV: "checkpoint_write:2"})
    assert code != 0
    assert [why for _, why in incomplete_checkpoints(out)] == ["its write did not finish"]
    steps = check_newest("after the kill during the asynchronous write")
    start = resume_index(trace, steps)
    # 2: the first optimizer step after the first roll-back's restore, counted from where the rerun starts.
    restore = trace.index("snapshot_restore", start)
    kill = trace.index("train_step", restore)
    code, err = _torchrun(base, demo_dir, out, "kill-2", {KILL_AT_ENV: f"train_step:{trace[start:kill + 1].count('train_step')}"})
    assert code != 0
    resumed = RESUMED.findall(err)
    assert len(resumed) == 1 and resumed[0][2] == str(steps), err[-3000:]
    assert len(IGNORED.findall(err)) == 1  # the half-written checkpoint, named and skipped
    at_kill = json.load(open(os.path.join(out, "history.json")))
    assert any(s["excluded"] for s in at_kill["stages"]), "the second kill comes after an exclusion"
    check_newest("after the kill after the exclusion")
    # 3: to the end.
    code, err = _torchrun(base, demo_dir, out, "rerun", {})
    assert code == 0, err[-3000:]
    assert len(RESUMED.findall(err)) == 1
    assert check_newest("at the end") == max(reference)
    assert _assert_same_run(whole, out, ignore=("config.train.keep_checkpoints",)) == 2  # the rerun keeps 2
