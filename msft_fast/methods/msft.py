"""mSFT: roll out the active mixture for C epochs, find the task that peaked earliest, exclude it
and roll back to its peak; repeat until no task is active (arXiv 2603.21606, MISSION.md).

The controller drives the trainer (train_until, evaluate, capture, restore); the decisions are pure
functions of the roll-out's per-task costs, so they are tested without training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from msft_fast.errors import ConfigError
from msft_fast.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.records import Evaluation, eval_points, evaluate
from msft_fast.methods.sft import final_record
from msft_fast.report import write_report
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


def run_msft(trainer: Trainer, history: History, metric: Metric) -> dict:
    cfg = trainer.cfg.msft
    names = list(trainer.task_names)
    weights_only = cfg.restore == "weights"
    # Worst case alive at once: one state per active task's best point plus the best pooled one.
    history.data["snapshot_pool"] = plan_pool(trainer.model, len(names) + 1, not weights_only, local_world_size())
    pool = trainer.make_pool(capacity=len(names) + 1, with_optimizer=not weights_only)
    active = list(names)
    ledger = StageLedger(trainer)

    start = evaluate(trainer, history, metric, stage=0, active=set(active))
    start_state = trainer.capture()
    best, best_state = start, pool.retain(start_state)  # best pooled evaluation over all stages
    stage = 0
    while active and stage < cfg.max_stages:
        trainer.tags["stage"] = stage
        rollout: list[Evaluation] = [start]
        held: dict[int, Snapshot] = {0: start_state}  # roll-out index -> state, while some task needs it
        begin = trainer.epoch_position
        if trainer.steps_until(begin + cfg.budget_epochs) == 0:
            raise ConfigError(f"config key 'msft.budget_epochs' ({cfg.budget_epochs}) is less than one optimizer step")
        for target in eval_points(begin, cfg.budget_epochs, cfg.evals_per_epoch):
            trainer.train_until(target)
            if trainer.counters.step == rollout[-1].step:
                continue  # fewer steps than evaluations: this state is already evaluated
            ev = evaluate(trainer, history, metric, stage=stage, active=set(active))
            rollout.append(ev)
            costs = [e.costs for e in rollout]
            needed = set(task_peaks(costs, active).values())
            for i in [i for i in held if i not in needed]:
                pool.release(held.pop(i))
            if len(rollout) - 1 in needed:
                held[len(rollout) - 1] = trainer.capture()
            if ev.pooled_cost < best.pooled_cost:
                pool.release(best_state)
                best = ev
                best_state = pool.retain(held[len(rollout) - 1]) if len(rollout) - 1 in held else trainer.capture()
            if cfg.patience is not None and peak_confirmed(costs, active, cfg.patience):
                break

        decision = choose_exclusion([e.costs for e in rollout], active, cfg.tie_break)
        peak_ids = {k: rollout[i].eval_id for k, i in decision.peaks.items()}
        if decision.excluded is None:
            keep = len(rollout) - 1
            history.add_stage(stage, excluded=None, rollback_to_eval=None, peak_evals=peak_ids,
                              **ledger.close(start_eval=rollout[0].eval_id, end_eval=rollout[-1].eval_id))
        else:
            keep = decision.peak_index
            target = rollout[keep]
            history.add_stage(stage, excluded=decision.excluded, rollback_to_eval=target.eval_id,
                              peak_evals=peak_ids,
                              **ledger.close(start_eval=rollout[0].eval_id, end_eval=rollout[-1].eval_id,
                                             rollback=target.record))
            trainer.restore(held[keep], weights_only=weights_only)
            active.remove(decision.excluded)
            if active:
                trainer.set_active([names.index(k) for k in active])
        history.write(trainer.ctx.is_main)
        if trainer.ctx.is_main:
            write_report(os.path.dirname(history.path), history.data)  # curves with this stage's decision
        # The kept state starts the next stage; every other state of this roll-out is released.
        start, start_state = rollout[keep], held.pop(keep)
        for snap in held.values():
            pool.release(snap)
        stage += 1

    pool.release(start_state)
    trainer.restore(best_state, weights_only=True)
    return final_record(best)
