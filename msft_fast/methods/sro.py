"""SRO (single roll-out), the baseline mSFT improves on: one full run on all tasks reads each task's
peak epoch; a second run from the same start excludes each task at that epoch. Same data,
evaluation and accounting as mSFT and SFT; the probe run's compute counts in the totals.
"""
from __future__ import annotations

from msft_fast.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.msft import task_peaks
from msft_fast.methods.records import eval_points, evaluate
from msft_fast.methods.sft import final_record
from msft_fast.trainer import Trainer


def run_sro(trainer: Trainer, history: History, metric: Metric) -> dict:
    cfg = trainer.cfg
    names = list(trainer.task_names)
    pool = trainer.make_pool(capacity=2, with_optimizer=True)
    ledger = StageLedger(trainer)
    points = eval_points(0.0, cfg.train.epochs, cfg.msft.evals_per_epoch)

    # Probe: every task for train.epochs epochs.
    trainer.tags["stage"] = 0
    base = trainer.capture()
    probe = [evaluate(trainer, history, metric, stage=0, active=set(names))]
    for target in points:
        trainer.train_until(target)
        if trainer.counters.step != probe[-1].step:
            probe.append(evaluate(trainer, history, metric, stage=0, active=set(names)))
    peaks = task_peaks([e.costs for e in probe], names)
    history.add_stage(0, excluded=None, rollback_to_eval=None, phase="probe",
                      peak_evals={k: probe[i].eval_id for k, i in peaks.items()},
                      **ledger.close(start_eval=probe[0].eval_id, end_eval=probe[-1].eval_id))
    history.write(trainer.ctx.is_main)

    # Schedule: from the same start, task k trains until its probe peak epoch, then leaves.
    trainer.restore(base)
    ledger = StageLedger(trainer)  # restore time belongs to the schedule run
    schedule = sorted((probe[i].epoch, names.index(k), k) for k, i in peaks.items())
    active = list(names)
    best, best_state = probe[0], base  # the start state was evaluated by the probe
    stage, stage_start, last = 1, probe[0], probe[0]

    def exclude_due() -> None:
        nonlocal stage, stage_start
        while schedule and schedule[0][0] <= trainer.epoch_position + 1e-9:
            task = schedule.pop(0)[2]
            active.remove(task)
            history.add_stage(stage, excluded=task, rollback_to_eval=None, phase="schedule",
                              **ledger.close(start_eval=stage_start.eval_id, end_eval=last.eval_id))
            stage, stage_start = stage + 1, last
            if active:
                trainer.set_active([names.index(k) for k in active])

    exclude_due()  # tasks that peaked at the start are never trained
    for position in sorted(set(points) | {epoch for epoch, _, _ in schedule}):
        if not active:
            break
        trainer.tags["stage"] = stage
        trainer.train_until(position)
        if position in points and trainer.counters.step != last.step:
            last = evaluate(trainer, history, metric, stage=stage, active=set(active))
            if last.pooled_cost < best.pooled_cost:
                pool.release(best_state)
                best, best_state = last, trainer.capture()
        exclude_due()
    history.write(trainer.ctx.is_main)
    trainer.restore(best_state, weights_only=True)
    return final_record(best)
