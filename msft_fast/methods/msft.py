"""mSFT: roll out the active mixture for C epochs, find the task that peaked earliest, exclude it
and roll back to its peak; repeat until no task is active (arXiv 2603.21606, MISSION.md).

The controller drives the trainer (train_until, evaluate, capture, restore); the decisions are pure
functions of the roll-out's per-task costs, so they are tested without training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from msft_fast.errors import ConfigError
from msft_fast.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.records import Evaluation, eval_points, evaluate
from msft_fast.methods.sft import final_record
from msft_fast.report import PeriodicReport
from msft_fast.snapshot import Snapshot, local_world_size, plan_pool
from msft_fast.trainer import Trainer


@dataclass
class Decision:
    excluded: Optional[str]  # None: nothing peaked before the roll-out's last evaluation
    peak_index: Optional[int]  # the roll-out evaluation to roll back to
    peaks: dict[str, int]  # every active task's best evaluation (index into the roll-out)


def task_peaks(costs: list[dict[str, float]], active: list[str]) -> dict[str, int]:
    """Index of each task's lowest cost; on equal costs the earliest evaluation counts."""
    return {k: min(range(len(costs)), key=lambda i: (costs[i][k], i)) for k in active}


def choose_exclusion(costs: list[dict[str, float]], active: list[str], tie_break: str) -> Decision:
    """costs[i][task]: cost (lower is better) at roll-out evaluation i (0 = the stage start).

    The active task whose best evaluation comes first is excluded, unless that is the last
    evaluation (no task overfit within the budget). Several tasks peaking at that same evaluation:
    `most_overfit` takes the one whose cost rose most from its peak to the roll-out's end (ties, and
    `first`, by the order of data.tasks).
    """
    peaks = task_peaks(costs, active)
    earliest = min(peaks.values())
    if earliest == len(costs) - 1:
        return Decision(None, None, peaks)
    tied = [k for k in active if peaks[k] == earliest]
    if tie_break == "most_overfit":
        rise = {k: costs[-1][k] - costs[earliest][k] for k in tied}
        tied.sort(key=lambda k: -rise[k])  # stable: config order breaks equal rises
    return Decision(tied[0], earliest, peaks)


def peak_confirmed(costs: list[dict[str, float]], active: list[str], patience: int) -> bool:
    """The earliest peak has held for `patience` evaluations: a task's best can only move later,
    so the task peaking first now is the one to exclude unless it improves again."""
    earliest = min(task_peaks(costs, active).values())
    return len(costs) - 1 - earliest >= patience


@dataclass
class MsftState:
    """Everything the controller knows; checkpointed (snapshots by reference) so a run resumes mid-roll-out."""

    active: list[str]
    start: Evaluation  # the evaluation the current stage starts from
    start_state: Optional[Snapshot]  # between stages; during a roll-out it is held[0]
    best: Evaluation  # best pooled evaluation over all stages
    best_state: Snapshot
    ledger: dict
    stage: int = 0
    rollout: list[Evaluation] = field(default_factory=list)  # this stage's evaluations; [] before it begins
    held: dict[int, Snapshot] = field(default_factory=dict)  # roll-out index -> state, while some task needs it
    begin: float = 0.0  # epoch position at the stage start
    next_target: int = 0  # index into the stage's evaluation points


def run_msft(trainer: Trainer, history: History, metric: Metric) -> dict:
    cfg = trainer.cfg.msft
    names = list(trainer.task_names)
    weights_only = cfg.restore == "weights"
    # Worst case alive at once: one state per active task's best point plus the best pooled one.
    plan = plan_pool(trainer.model, len(names) + 1, not weights_only, local_world_size(),
                     spill_dir=cfg.snapshot_spill_dir)
    history.data["snapshot_pool"] = plan
    pool = trainer.make_pool(capacity=len(names) + 1, with_optimizer=not weights_only,
                             in_memory=plan["in_memory_states"], spill_dir=plan["spill_dir"])
    ledger = StageLedger(trainer)
    st: MsftState = trainer.resumed_method_state()
    if st is None:
        start = evaluate(trainer, history, metric, stage=0, active=set(names))
        start_state = trainer.capture()
        st = MsftState(list(names), start, start_state, start, pool.retain(start_state), ledger.start)
    ledger.start = st.ledger
    trainer.method_state = st
    report = PeriodicReport(os.path.dirname(history.path))

    while st.active and st.stage < cfg.max_stages:
        trainer.tags["stage"] = st.stage
        if not st.rollout:  # the stage begins
            st.rollout, st.held, st.start_state = [st.start], {0: st.start_state}, None  # held owns it now
            st.begin, st.next_target = trainer.epoch_position, 0
            if trainer.steps_until(st.begin + cfg.budget_epochs) == 0:
                raise ConfigError(f"config key 'msft.budget_epochs' ({cfg.budget_epochs}) is less than one optimizer step")
        targets = eval_points(st.begin, cfg.budget_epochs, cfg.evals_per_epoch)
        while st.next_target < len(targets):
            trainer.train_until(targets[st.next_target])  # a checkpoint inside resumes right here
            st.next_target += 1
            if trainer.counters.step == st.rollout[-1].step:
                continue  # fewer steps than evaluations: this state is already evaluated
            ev = evaluate(trainer, history, metric, stage=st.stage, active=set(st.active))
            st.rollout.append(ev)
            costs = [e.costs for e in st.rollout]
            needed = set(task_peaks(costs, st.active).values())
            for i in [i for i in st.held if i not in needed]:
                pool.release(st.held.pop(i))
            last = len(st.rollout) - 1
            if last in needed:
                st.held[last] = trainer.capture()
            if ev.pooled_cost < st.best.pooled_cost:
                pool.release(st.best_state)
                st.best = ev
                st.best_state = pool.retain(st.held[last]) if last in st.held else trainer.capture()
            if cfg.patience is not None and peak_confirmed(costs, st.active, cfg.patience):
                break
        _end_stage(trainer, history, st, ledger, weights_only, report)
        st.ledger = ledger.start

    pool.release(st.start_state)
    trainer.restore(st.best_state, weights_only=True)
    return final_record(st.best)


def _end_stage(trainer: Trainer, history: History, st: MsftState, ledger: StageLedger, weights_only: bool,
               report: PeriodicReport) -> None:
    """Record the roll-out's decision, roll back if a task is excluded, and set up the next stage."""
    cfg, names, rollout, pool = trainer.cfg.msft, trainer.task_names, st.rollout, trainer.pool
    decision = choose_exclusion([e.costs for e in rollout], st.active, cfg.tie_break)
    peak_ids = {k: rollout[i].eval_id for k, i in decision.peaks.items()}
    if decision.excluded is None:
        keep = len(rollout) - 1
        history.add_stage(st.stage, excluded=None, rollback_to_eval=None, peak_evals=peak_ids,
                          **ledger.close(start_eval=rollout[0].eval_id, end_eval=rollout[-1].eval_id))
    else:
        keep = decision.peak_index
        target = rollout[keep]
        history.add_stage(st.stage, excluded=decision.excluded, rollback_to_eval=target.eval_id,
                          peak_evals=peak_ids,
                          **ledger.close(start_eval=rollout[0].eval_id, end_eval=rollout[-1].eval_id,
                                         rollback=target.record))
        trainer.restore(st.held[keep], weights_only=weights_only)
        st.active.remove(decision.excluded)
        if st.active:
            trainer.set_active([names.index(k) for k in st.active])
    history.write(trainer.ctx.is_main)
    if trainer.ctx.is_main:
        report(history.data)  # curves with this stage's decision
    # The kept state starts the next stage; every other state of this roll-out is released.
    st.start, st.start_state = rollout[keep], st.held.pop(keep)
    for snap in st.held.values():
        pool.release(snap)
    st.rollout, st.held = [], {}
    st.stage += 1
