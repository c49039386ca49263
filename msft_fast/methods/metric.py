"""The validation metric a method selects by: per-task scores and a pooled score per evaluation.

Internally every score is turned into a cost (lower is better), so the search code has one
direction. Built in: `val_loss` (token-weighted pooled loss), `val_token_acc` (teacher-forced
next-token accuracy) and `val_exact_match` (greedy answers to the validation prompts equal to the
references, as the mSFT paper judges; pooled over all answers; exact_match.py), all computed by
`Trainer.evaluate` on every rank. A user callback `module:function` is called on every rank as
`function(model, tokenizer, task_names) -> {task: score}` (higher is better, e.g. exact match of
generated answers); rank 0's scores are used and the pooled score is their mean.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Optional

from msft_fast.config import BUILTIN_METRICS
from msft_fast.runtime.distributed import broadcast_object
from msft_fast.errors import ConfigError, on_every_rank
from msft_fast.training.trainer import EvalResult, Trainer


class Metric:
    def __init__(self, spec: str):
        self.name = spec
        self.higher_is_better = spec != "val_loss"
        self._callback: Optional[Callable] = None
        if spec not in BUILTIN_METRICS:
            module, _, func = spec.partition(":")
            try:
                self._callback = getattr(importlib.import_module(module), func)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"config key 'msft.metric': cannot import '{spec}' ({e})") from None

    def scores(self, trainer: Trainer, result: EvalResult) -> tuple[dict[str, float], float]:
        """Per-task scores and the pooled score of one evaluation (in the metric's own direction)."""
        if self.name == "val_loss":
            return {n: s.loss for n, s in result.tasks.items()}, result.pooled_loss
        if self.name == "val_token_acc":
            return {n: s.token_acc for n, s in result.tasks.items()}, result.pooled_token_acc
        if self.name == "val_exact_match":
            return {n: s.exact_match for n, s in result.tasks.items()}, result.exact_match.pooled
        tokenizer = trainer.tokenizer
        raw = trainer.call_with_full_model(lambda model: self._callback(model, tokenizer, list(trainer.task_names)))
        raw = broadcast_object(raw)
        missing = [n for n in trainer.task_names if n not in (raw or {})]
        if missing:
            raise on_every_rank(ConfigError(f"config key 'msft.metric': '{self.name}' returned no score for tasks "
                                            f"{missing}"))  # rank 0's scores, broadcast: the same on every rank
        per_task = {n: float(raw[n]) for n in trainer.task_names}
        return per_task, sum(per_task.values()) / len(per_task)

    def cost(self, score: float) -> float:
        """Lower is better; NaN (a diverged evaluation) is the worst possible cost."""
        if math.isnan(score):
            return math.inf
        return -score if self.higher_is_better else score
