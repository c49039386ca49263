"""SIGKILL at named points of an mSFT run (mid-step, mid-evaluation, mid-snapshot capture and restore,
mid-checkpoint write and deletion, mid-export), then the same command again. The rerun must say
which complete checkpoint it resumes from, name and skip what the kill left half-written, do exactly
the work an uninterrupted run did after that checkpoint, and end bitwise equal to it.

The kills come from msft_fast/fault_injection.py. An uninterrupted run records the sequence of
fault points it passes (its trace); a kill is planned as an index into that trace, and every process
records its own trace, which must be the uninterrupted one from where it resumed to where it died.
The runs are real processes (tests/forked_cli.py) on the compact demo's upper/noisy_codes/sort tasks.
"""
from __future__ import annotations

import os
import random
import re

import pytest

import forked_cli
from msft_fast.checkpoint import complete_checkpoints, incomplete_checkpoints, read_meta
from msft_fast.fault_injection import KILL_AT_ENV, POINTS, TRACE_ENV
from test_resume import _assert_same_run, _overrides

pytestmark = pytest.mark.slow

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
    """Seeded (MSFT_FAST_SOAK_SEED, default 0): one kill at a random point of each third of the run
    that follows the first checkpoint."""
    base, whole, trace = reference
    seed = int(os.environ.get("MSFT_FAST_SOAK_SEED", "0"))
    rng = random.Random(seed)
    first = trace.index("checkpoint_write") + 1
    span = (len(trace) - first) / 3
    kills = [rng.randrange(first + int(i * span), first + int((i + 1) * span)) for i in range(3)]
    runs = KilledAndRerun(base, demo_dir, f"soak-{seed}", trace)
    for index in kills:
        runs.run(index)
    runs.run()
    _assert_same_run(whole, runs.out)
