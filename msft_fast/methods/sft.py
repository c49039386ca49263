"""Plain multi-task SFT: all tasks for `train.epochs` epochs, evaluated every 1/evals_per_epoch
epoch; the final model is the evaluation with the best pooled metric."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from msft_fast.state.history import History
from msft_fast.methods.ledger import StageLedger
from msft_fast.methods.metric import Metric
from msft_fast.methods.records import Evaluation, eval_points, evaluate
from msft_fast.state.snapshot import Snapshot
from msft_fast.training.trainer import Trainer


@dataclass
class SftState:
    """Checkpointed with the trainer, so a run resumes between two evaluations."""

    ledger: dict
    next_target: int = 0  # index into the evaluation points; 0 is the start
    best: Optional[Evaluation] = None
    best_state: Optional[Snapshot] = None
    last: Optional[Evaluation] = None


def run_sft(trainer: Trainer, history: History, metric: Metric) -> dict:
    """Returns the `final` record; the trainer's model is left holding the chosen weights."""
    pool = trainer.make_pool(capacity=1, with_optimizer=False)
    everyone = set(trainer.task_names)
    ledger = StageLedger(trainer)
    st: SftState = trainer.resumed_method_state() or SftState(ledger.start)
    ledger.start = st.ledger
    trainer.method_state = st
    targets = [0.0] + eval_points(0.0, trainer.cfg.train.epochs, trainer.cfg.msft.evals_per_epoch)
    while st.next_target < len(targets):
        trainer.train_until(targets[st.next_target])
        st.next_target += 1
        if st.last is not None and st.last.step == trainer.counters.step:
            continue  # fewer steps per epoch than evaluations: this state is already evaluated
        st.last = evaluate(trainer, history, metric, stage=0, active=everyone)
        keep_if_best(st, pool, trainer)
    history.add_stage(0, excluded=None, rollback_to_eval=None, epochs_trained=round(trainer.epoch_position, 6),
                      **ledger.close(start_eval=0, end_eval=st.last.eval_id))
    trainer.restore(st.best_state, weights_only=True)
    return final_record(st.best)


def keep_if_best(st, pool, trainer: Trainer) -> None:
    """Hold the state behind `st.last` in `st.best_state` when its pooled metric beats `st.best`'s
    (the first evaluation always does). The previous best is released first, so its buffers serve
    the new capture."""
    if st.best is None or st.last.pooled_cost < st.best.pooled_cost:
        pool.release(st.best_state)
        st.best, st.best_state = st.last, trainer.capture()


def final_record(best) -> dict:
    extra = {k: best.record[k] for k in ("pooled_val_exact_match",) if k in best.record}
    return {"eval_id": best.eval_id, "pooled_val_loss": best.record["pooled_val_loss"], **extra,
            "pooled_metric": best.record["pooled_metric"]}
