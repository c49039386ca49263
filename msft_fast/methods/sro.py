"""SRO (single roll-out), the baseline mSFT improves on: one full run on all tasks reads each task's
peak epoch; a second run from the same start excludes each task at that epoch. Same data,
evaluation and accounting as mSFT and SFT; the probe run's compute counts in the totals.

A task that peaked at the probe's last evaluation trains to the end of the second run (it is never
"excluded" at the end); when no task peaked earlier, the second run would repeat the first step for
step, so it is skipped and the probe's end is the final model (history.json `sro` says which).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from msft_fast.state.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.msft import effective_peaks
from msft_fast.methods.records import Evaluation, announce, eval_points, evaluate
from msft_fast.methods.sft import final_record, keep_if_best
from msft_fast.state.snapshot import Snapshot
from msft_fast.training.trainer import Trainer


@dataclass
class SroState:
    """Checkpointed with the trainer, so a run resumes in either run."""

    ledger: dict
    base: Optional[Snapshot]  # the common start of both runs (until the schedule run starts)
    probe: list[Evaluation]
    next_target: int = 0  # probe: index into the evaluation points
    phase: str = "probe"  # probe | schedule
    schedule: list = field(default_factory=list)  # (epoch, task index, task, probe eval id) still to exclude
    active: list[str] = field(default_factory=list)
    positions: list[float] = field(default_factory=list)  # schedule: evaluation and exclusion points
    next_position: int = 0
    stage: int = 1
    best: Optional[Evaluation] = None
    best_state: Optional[Snapshot] = None
    stage_start: Optional[Evaluation] = None
    last: Optional[Evaluation] = None
    segment_begin: float = 0.0  # schedule: epoch position where the current stage began


def run_sro(trainer: Trainer, history: History, metric: Metric) -> dict:
    cfg = trainer.cfg
    names = list(trainer.task_names)
    pool = trainer.make_pool(capacity=2, with_optimizer=True)
    ledger = StageLedger(trainer)
    points = eval_points(0.0, cfg.train.epochs, cfg.msft.evals_per_epoch)
    st: SroState = trainer.resumed_method_state()
    if st is None:
        trainer.tags["stage"] = 0
        base = trainer.capture()
        st = SroState(ledger.start, base, [evaluate(trainer, history, metric, stage=0, active=set(names))])
    ledger.start = st.ledger
    trainer.method_state = st

    def close_stage(excluded: Optional[str], peak_eval: Optional[int]) -> None:
        """Record the schedule run's stage that ends here (at an exclusion, or at the end)."""
        epochs = trainer.epoch_position - st.segment_begin
        history.add_stage(st.stage, excluded=excluded, rollback_to_eval=None, phase="schedule",
                          peak_evals={} if excluded is None else {excluded: peak_eval},
                          epochs_trained=round(epochs, 6),
                          **ledger.close(start_eval=st.stage_start.eval_id, end_eval=st.last.eval_id))
        st.ledger = ledger.start
        st.stage, st.stage_start, st.segment_begin = st.stage + 1, st.last, trainer.epoch_position

    def exclude_due() -> None:
        while st.schedule and st.schedule[0][0] <= trainer.epoch_position + 1e-9:
            epoch, _, task, peak_eval = st.schedule.pop(0)
            st.active.remove(task)
            close_stage(task, peak_eval)
            announce(trainer, f"sro pass 2: excluded '{task}' at epoch {epoch:.2f}, its peak in pass 1 (eval "
                              f"{peak_eval}); {len(st.active)} task(s) still active: {', '.join(st.active) or 'none'}")
            if st.active:
                trainer.set_active([names.index(k) for k in st.active])

    if st.phase == "probe":  # every task for train.epochs epochs
        while st.next_target < len(points):
            trainer.train_until(points[st.next_target])
            st.next_target += 1
            if trainer.counters.step != st.probe[-1].step:
                st.probe.append(evaluate(trainer, history, metric, stage=0, active=set(names)))
        peaks = effective_peaks([e.costs for e in st.probe], names, cfg.msft.min_delta, cfg.msft.peak_ties)
        history.add_stage(0, excluded=None, rollback_to_eval=None, phase="probe",
                          peak_evals={k: st.probe[i].eval_id for k, i in peaks.items()},
                          epochs_trained=round(trainer.epoch_position, 6),
                          **ledger.close(start_eval=st.probe[0].eval_id, end_eval=st.probe[-1].eval_id))
        last = st.probe[-1]
        early = {k: i for k, i in peaks.items() if i < len(st.probe) - 1}
        if not early:
            # Every task was at its best at the probe's end: pass 2 would exclude nothing before the
            # end and repeat pass 1 step for step. The pooled metric is a positive-weighted sum of
            # the tasks' metrics, so it is at its best there too: pass 1's end is the final model.
            history.data["sro"] = {"second_pass": False, "summary": (
                f"pass 2 skipped: no task peaked before pass 1's last evaluation (eval {last.eval_id}, epoch "
                f"{last.epoch:.2f}), so it would repeat pass 1; the final model is pass 1's end")}
            announce(trainer, "sro: " + history.data["sro"]["summary"])
            history.write(trainer.ctx.is_main)
            pool.release(st.base)
            st.base = None
            return final_record(last)
        history.write(trainer.ctx.is_main)
        announce(trainer, "sro pass 1 (probe) peaks: " + ", ".join(
            f"{k} at epoch {st.probe[i].epoch:.2f}" + ("" if k in early else " (the end: trains to the end)")
            for k, i in sorted(peaks.items(), key=lambda kv: (kv[1], names.index(kv[0])))))

        # Schedule: from the same start, task k trains until its probe peak epoch, then leaves.
        # A task that peaked at the probe's end trains to the end: it is never excluded.
        trainer.restore(st.base)
        ledger = StageLedger(trainer)  # restore time belongs to the schedule run
        st.ledger = ledger.start
        st.schedule = sorted((st.probe[i].epoch, names.index(k), k, st.probe[i].eval_id) for k, i in early.items())
        st.positions = sorted(set(points) | {epoch for epoch, *_ in st.schedule})
        st.active = list(names)
        # The start state was evaluated by the probe; from here on best_state owns it.
        st.best, st.best_state, st.base = st.probe[0], st.base, None
        st.stage_start = st.last = st.probe[0]
        st.segment_begin = trainer.epoch_position
        st.phase = "schedule"
        history.data["sro"] = {"second_pass": True, "summary": (
            f"pass 1 (probe) trained every task for {last.epoch:.2f} epochs (evals {st.probe[0].eval_id}-"
            f"{last.eval_id}); pass 2 restarted from eval {st.probe[0].eval_id} and excluded "
            + ", ".join(f"{k} at epoch {e:.2f}" for e, _, k, _ in st.schedule)
            + (f"; {', '.join(k for k in names if k not in early)} trained to the end" if len(early) < len(names)
               else ""))}
        exclude_due()  # tasks that peaked at the start are never trained

    while st.next_position < len(st.positions) and st.active:
        position = st.positions[st.next_position]
        trainer.tags["stage"] = st.stage
        trainer.train_until(position)
        st.next_position += 1
        if position in points and trainer.counters.step != st.last.step:
            st.last = evaluate(trainer, history, metric, stage=st.stage, active=set(st.active))
            keep_if_best(st, pool, trainer)  # st.best is the probe's start evaluation here
        exclude_due()
    if st.active:  # the tasks that peaked at the probe's end trained to the end in this last stage
        close_stage(None, None)
    history.write(trainer.ctx.is_main)
    trainer.restore(st.best_state, weights_only=True)
    return final_record(st.best)
