"""Evaluate, score, record in history.json and log: the same for every method."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from msft_fast.state.history import History
from msft_fast.methods.metric import Metric
from msft_fast.training.progress import above_progress
from msft_fast.training.trainer import EvalResult, Trainer

log = logging.getLogger("msft_fast")


@dataclass
class Evaluation:
    eval_id: int
    step: int
    epoch: float
    costs: dict[str, float]  # per task, lower is better
    pooled_cost: float
    record: dict


def eval_points(start: float, length: float, evals_per_epoch: int) -> list[float]:
    """Epoch positions of the evaluations in (start, start + length]: every 1/evals_per_epoch, and the end."""
    k = math.floor(length * evals_per_epoch + 1e-9)
    points = [start + i / evals_per_epoch for i in range(1, k + 1)]
    if not points or points[-1] < start + length - 1e-9:
        points.append(start + length)
    return points


def evaluate(trainer: Trainer, history: History, metric: Metric, stage: int, active: set[str]) -> Evaluation:
    result = trainer.evaluate()
    scores, pooled = metric.scores(trainer, result)
    c = trainer.counters
    record = history.add_eval({
        "step": c.step,
        "steps_trained": c.steps_trained,
        "epoch": round(trainer.epoch_position, 6),
        "stage": stage,
        "train_flops": c.train_flops,
        "kept_train_flops": c.kept_train_flops,
        "eval_flops": c.eval_flops,
        "pooled_val_loss": result.pooled_loss,
        "pooled_val_token_acc": result.pooled_token_acc,
        **_exact_match_fields(result),
        "pooled_metric": pooled,
        "tasks": {
            name: {"val_loss": s.loss, "val_token_acc": s.token_acc, "val_tokens": s.tokens,
                   **({"val_exact_match": s.exact_match, "val_answers": s.answers,
                       "val_answers_correct": s.answers_correct} if result.exact_match is not None else {}),
                   "metric": scores[name], "active": name in active}
            for name, s in result.tasks.items()
        },
    })
    if result.exact_match is not None:
        history.data["exact_match"] = trainer.exact_match_setup()
    history.write(trainer.ctx.is_main)
    _log(trainer, record, metric)
    return Evaluation(record["eval_id"], c.step, trainer.epoch_position,
                      {n: metric.cost(v) for n, v in scores.items()}, metric.cost(pooled), record)


def _exact_match_fields(result: EvalResult) -> dict:
    """An evaluation's pooled exact match (over all answers) and its generation's cost."""
    em = result.exact_match
    if em is None:
        return {}
    return {"pooled_val_exact_match": em.pooled,
            "generation": {"tokens": em.generated_tokens, "flops": em.flops, "seconds": em.seconds,
                           "tokens_per_s": em.generated_tokens / em.seconds if em.seconds > 0 else None}}


def _log(trainer: Trainer, record: dict, metric: Metric) -> None:
    if not trainer.ctx.is_main:
        return
    per_task = "  ".join(f"{n}{'' if t['active'] else '(x)'} {t['metric']:.3f}" for n, t in record["tasks"].items())
    message = (f"eval {record['eval_id']} @ epoch {record['epoch']:.2f} (step {record['step']}, stage {record['stage']}): "
               f"pooled {metric.name} {record['pooled_metric']:.4f} | {per_task}")
    if "pooled_val_exact_match" in record and metric.name != "val_exact_match":  # scored beside the metric
        answers = "  ".join(f"{n} {t['val_exact_match']:.3f}" for n, t in record["tasks"].items())
        message += f" || exact match {record['pooled_val_exact_match']:.4f} | {answers}"
    if trainer.progress is not None:
        trainer.progress.write(message)
    else:
        print(message, flush=True)


def announce(trainer: Trainer, message: str, level: int = logging.INFO) -> None:
    """A method's decision or warning, logged by rank 0 (console and log), above a live progress bar."""
    if trainer.ctx.is_main:
        with above_progress(trainer.progress):
            log.log(level, "%s", message)
