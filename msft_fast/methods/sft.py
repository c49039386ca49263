"""Plain multi-task SFT: all tasks for `train.epochs` epochs, evaluated every 1/evals_per_epoch
epoch; the final model is the evaluation with the best pooled metric."""
from __future__ import annotations

from msft_fast.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.records import eval_points, evaluate
from msft_fast.trainer import Trainer


def run_sft(trainer: Trainer, history: History, metric: Metric) -> dict:
    """Returns the `final` record; the trainer's model is left holding the chosen weights."""
    pool = trainer.make_pool(capacity=1, with_optimizer=False)
    everyone = set(trainer.task_names)
    ledger = StageLedger(trainer)
    best, best_state, last = None, None, None
    for target in [0.0] + eval_points(0.0, trainer.cfg.train.epochs, trainer.cfg.msft.evals_per_epoch):
        trainer.train_until(target)
        if last is not None and last.step == trainer.counters.step:
            continue  # fewer steps per epoch than evaluations: this state is already evaluated
        last = evaluate(trainer, history, metric, stage=0, active=everyone)
        if best is None or last.pooled_cost < best.pooled_cost:
            pool.release(best_state)  # first, so its buffers serve the new capture
            best, best_state = last, trainer.capture()
    history.add_stage(0, excluded=None, rollback_to_eval=None, **ledger.close(start_eval=0, end_eval=last.eval_id))
    trainer.restore(best_state, weights_only=True)
    return final_record(best)


def final_record(best) -> dict:
    return {"eval_id": best.eval_id, "pooled_val_loss": best.record["pooled_val_loss"],
            "pooled_metric": best.record["pooled_metric"]}
