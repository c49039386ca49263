"""SRO (single roll-out), the baseline mSFT improves on: one full run on all tasks reads each task's
peak epoch; a second run from the same start excludes each task at that epoch. Same data,
evaluation and accounting as mSFT and SFT; the probe run's compute counts in the totals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from msft_fast.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.msft import task_peaks
from msft_fast.methods.records import Evaluation, eval_points, evaluate
from msft_fast.methods.sft import final_record
from msft_fast.snapshot import Snapshot
from msft_fast.trainer import Trainer


@dataclass
class SroState:
    """Checkpointed with the trainer, so a run resumes in either run."""

    ledger: dict
    base: Optional[Snapshot]  # the common start of both runs (until the schedule run starts)
    probe: list[Evaluation]
    next_target: int = 0  # probe: index into the evaluation points
    phase: str = "probe"  # probe | schedule
    schedule: list = field(default_factory=list)  # (epoch, task index, task) still to exclude
    active: list[str] = field(default_factory=list)
    positions: list[float] = field(default_factory=list)  # schedule: evaluation and exclusion points
    next_position: int = 0
    stage: int = 1
    best: Optional[Evaluation] = None
    best_state: Optional[Snapshot] = None
    stage_start: Optional[Evaluation] = None
    last: Optional[Evaluation] = None


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

    def exclude_due() -> None:
        while st.schedule and st.schedule[0][0] <= trainer.epoch_position + 1e-9:
            task = st.schedule.pop(0)[2]
            st.active.remove(task)
            history.add_stage(st.stage, excluded=task, rollback_to_eval=None, phase="schedule",
                              **ledger.close(start_eval=st.stage_start.eval_id, end_eval=st.last.eval_id))
            st.ledger = ledger.start
            st.stage, st.stage_start = st.stage + 1, st.last
            if st.active:
                trainer.set_active([names.index(k) for k in st.active])

    if st.phase == "probe":  # every task for train.epochs epochs
        while st.next_target < len(points):
            trainer.train_until(points[st.next_target])
            st.next_target += 1
            if trainer.counters.step != st.probe[-1].step:
                st.probe.append(evaluate(trainer, history, metric, stage=0, active=set(names)))
        peaks = task_peaks([e.costs for e in st.probe], names)
        history.add_stage(0, excluded=None, rollback_to_eval=None, phase="probe",
                          peak_evals={k: st.probe[i].eval_id for k, i in peaks.items()},
                          **ledger.close(start_eval=st.probe[0].eval_id, end_eval=st.probe[-1].eval_id))
        history.write(trainer.ctx.is_main)

        # Schedule: from the same start, task k trains until its probe peak epoch, then leaves.
        trainer.restore(st.base)
        ledger = StageLedger(trainer)  # restore time belongs to the schedule run
        st.ledger = ledger.start
        st.schedule = sorted((st.probe[i].epoch, names.index(k), k) for k, i in peaks.items())
        st.positions = sorted(set(points) | {epoch for epoch, _, _ in st.schedule})
        st.active = list(names)
        # The start state was evaluated by the probe; from here on best_state owns it.
        st.best, st.best_state, st.base = st.probe[0], st.base, None
        st.stage_start = st.last = st.probe[0]
        st.phase = "schedule"
        exclude_due()  # tasks that peaked at the start are never trained

    while st.next_position < len(st.positions) and st.active:
        position = st.positions[st.next_position]
        trainer.tags["stage"] = st.stage
        trainer.train_until(position)
        st.next_position += 1
        if position in points and trainer.counters.step != st.last.step:
            st.last = evaluate(trainer, history, metric, stage=st.stage, active=set(st.active))
            if st.last.pooled_cost < st.best.pooled_cost:
                pool.release(st.best_state)
                st.best, st.best_state = st.last, trainer.capture()
        exclude_due()
    history.write(trainer.ctx.is_main)
    trainer.restore(st.best_state, weights_only=True)
    return final_record(st.best)
