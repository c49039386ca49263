"""Progress on the console: a live bar only on a terminal; periodic log lines in logs and pipes; rates
over training time alone; an ETA that counts the evaluations still to come; each line names the step
whose loss it shows."""
from __future__ import annotations

import io
import logging

import pytest

from msft_fast.training.progress import Progress, ProgressLines, RunClock, make_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_on_a_terminal():
    from msft_fast.training.progress import _Bar

    bar = make_progress(10, enabled=True, stream=_Terminal())
    try:
        assert isinstance(bar.display, _Bar)
    finally:
        bar.close()
    piped = make_progress(10, enabled=True, stream=io.StringIO())
    assert isinstance(piped.display, ProgressLines)
    assert make_progress(10, enabled=False, stream=_Terminal()) is None


def _record(step, loss, tokens=1000, seconds=1.0):
    return {"steps_trained": step, "loss": loss, "epoch": step / 50, "tokens": tokens, "step_seconds": seconds}


def _lines(total, interval, evals=None, worst_case=False):
    now = [0.0]
    display = ProgressLines(interval, clock=lambda: now[0])
    return Progress(display, total, evals, worst_case), now


def test_lines_name_the_step_they_show_and_rate_training_time_only(caplog):
    """One step a second of training; an evaluation of 20 s after step 20 counts neither in the
    tokens/s nor as training time, but the ETA adds the evaluations still to come."""
    progress, now = _lines(total=100, interval=30.0, evals=5)
    progress.evaluation(20.0)  # the start
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        for step in range(1, 41):
            now[0] += 1.0
            if step == 21:
                progress.evaluation(20.0)
                now[0] += 20.0
            progress.step(_record(step, loss=1 / step))
        progress.close()
    got = [r.getMessage() for r in caplog.records]
    # Step 21, after the evaluation, is the first past 30 s: 79 steps left at 1 s of training each,
    # and 3 of the 5 evaluations left at 20 s each.
    assert got[0] == "step 21/100 (21%), loss 0.0476, epoch 0.42, train tokens/s 1000, ETA 2:19"
    assert got[-1] == "step 40/100 (40%), loss 0.0250, epoch 0.80, train tokens/s 1000, ETA 2:00"
    assert not any("\r" in m for m in got)


def test_a_bounded_run_shows_its_worst_case(caplog):
    progress, now = _lines(total=200, interval=1.0, evals=10, worst_case=True)
    progress.evaluation(2.0)
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        now[0] = 5.0
        progress.step(_record(50, loss=0.5, seconds=0.5))
    assert [r.getMessage() for r in caplog.records] == [
        "step 50/<=200 (>=25%), loss 0.5000, epoch 1.00, train tokens/s 2000, ETA <=1:33"]


def test_lines_without_a_known_total(caplog):
    progress, now = _lines(total=None, interval=5.0)
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        now[0] = 10.0
        progress.step(_record(20, loss=0.25, tokens=500, seconds=0.25))
        progress.close()  # nothing new since the last line: no repeat
    assert [r.getMessage() for r in caplog.records] == ["step 20, loss 0.2500, epoch 0.40, train tokens/s 2000"]


def test_a_resumed_run_counts_from_its_checkpoint(caplog):
    progress, now = _lines(total=100, interval=1.0, evals=4)
    progress.resumed(60, evals=3)
    progress.evaluation(10.0)  # the 4th and last
    with caplog.at_level(logging.INFO, logger="msft_fast"):
        now[0] = 2.0
        progress.step(_record(61, loss=1.0, seconds=2.0))
    assert caplog.records[-1].getMessage().startswith("step 61/100 (61%)")
    assert caplog.records[-1].getMessage().endswith("ETA 1:18")  # 39 steps x 2 s, no evaluation left


def test_run_clock_eta_needs_a_timed_step_and_a_timed_evaluation():
    clock = RunClock()
    assert clock.eta(10, 0) is None
    clock.step(100, 2.0)
    assert clock.eta(10, 0) == pytest.approx(20.0)
    assert clock.eta(10, 1) is None  # an evaluation's cost is not known yet
    clock.evaluation(5.0)
    assert clock.eta(10, 2) == pytest.approx(30.0)
    assert clock.tokens_per_s() == pytest.approx(50.0)


def test_an_evaluation_line_shows_exact_match_when_answers_are_scored(capsys):
    """With msft.report_exact_match the answers are scored beside the selecting metric: the console
    line shows both."""
    from types import SimpleNamespace

    from msft_fast.methods.metric import Metric
    from msft_fast.methods.records import _log

    trainer = SimpleNamespace(ctx=SimpleNamespace(is_main=True), progress=None)
    record = {"eval_id": 3, "epoch": 1.0, "step": 40, "stage": 0, "pooled_metric": 1.25, "pooled_val_exact_match": 0.36,
              "tasks": {"upper": {"metric": 1.0, "active": True, "val_exact_match": 0.65},
                        "capitals": {"metric": 1.5, "active": False, "val_exact_match": 0.0}}}
    _log(trainer, record, Metric("val_loss"))
    assert capsys.readouterr().out.strip() == (
        "eval 3 @ epoch 1.00 (step 40, stage 0): pooled val_loss 1.2500 | upper 1.000  capitals(x) 1.500"
        " || exact match 0.3600 | upper 0.650  capitals 0.000")
