"""Plain multi-task SFT: all tasks for `train.epochs` epochs, evaluated every 1/evals_per_epoch
epoch; the final model is the evaluation with the best pooled validation loss."""
from __future__ import annotations

import math

from msft_fast.history import History
from msft_fast.trainer import EvalResult, Trainer


def eval_points(epochs: float, evals_per_epoch: int) -> list[float]:
    """Epoch positions of the evaluations after the start: every 1/evals_per_epoch, and the end."""
    k = math.floor(epochs * evals_per_epoch + 1e-9)
    points = [i / evals_per_epoch for i in range(1, k + 1)]
    if not points or points[-1] < epochs - 1e-9:
        points.append(epochs)
    return points


def run_sft(trainer: Trainer, history: History) -> dict:
    """Returns the `final` record; the trainer's model is left holding the chosen weights."""
    cfg = trainer.cfg
    best = None  # (pooled loss, eval_id, snapshot)
    history.add_stage(0, excluded=None, rollback_to_eval=None)
    for target in [0.0] + eval_points(cfg.train.epochs, cfg.msft.evals_per_epoch):
        trainer.train_until(target)
        if history.evals and history.evals[-1]["step"] == trainer.counters.step:
            continue  # fewer steps per epoch than evaluations: this state is already evaluated
        result = trainer.evaluate()
        record = history.add_eval(eval_record(trainer, result, stage=0, active=set(trainer.task_names)))
        history.write(trainer.ctx.is_main)
        log_eval(trainer, record, result)
        if best is None or result.pooled_loss < best[0]:
            best = (result.pooled_loss, record["eval_id"], trainer.snapshot_weights())
    pooled, eval_id, snapshot = best
    trainer.restore_weights(snapshot)
    return {"eval_id": eval_id, "pooled_val_loss": pooled}


def eval_record(trainer: Trainer, result: EvalResult, stage: int, active: set[str]) -> dict:
    c = trainer.counters
    return {
        "step": c.step,
        "epoch": round(trainer.epoch_position, 6),
        "stage": stage,
        "train_flops": c.train_flops,
        "eval_flops": c.eval_flops,
        "pooled_val_loss": result.pooled_loss,
        "tasks": {
            name: {"val_loss": s.loss, "val_token_acc": s.token_acc, "val_tokens": s.tokens, "active": name in active}
            for name, s in result.tasks.items()
        },
    }


def log_eval(trainer: Trainer, record: dict, result: EvalResult) -> None:
    if not trainer.ctx.is_main:
        return
    per_task = "  ".join(f"{n} {s.loss:.3f}" for n, s in result.tasks.items())
    message = (f"eval {record['eval_id']} @ epoch {record['epoch']:.2f} (step {record['step']}): "
               f"pooled val loss {result.pooled_loss:.4f} | {per_task}")
    if trainer.progress is not None:
        trainer.progress.write(message)
    else:
        print(message, flush=True)
