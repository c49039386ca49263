"""Per-stage accounting: what a stage trained, evaluated, kept and threw away, and its time split."""
from __future__ import annotations

from typing import Optional

from msft_fast.training.trainer import Trainer


class StageLedger:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.start = self._now()  # plain data: methods checkpoint it with their state

    def _now(self) -> dict:
        c, pool = self.trainer.counters, self.trainer.pool
        return {
            "steps": c.steps_trained, "train_flops": c.train_flops, "eval_flops": c.eval_flops,
            "trained_tokens": c.trained_tokens, "train": c.train_seconds, "eval": c.eval_seconds,
            "snapshot": sum(pool.capture_seconds) if pool else 0.0,
            "restore": sum(pool.restore_seconds) if pool else 0.0,
        }

    def close(self, start_eval: int, end_eval: int, rollback: Optional[dict] = None) -> dict:
        """Fields of this stage's history record; `rollback` is the eval record restored to (if any).
        Starts the next stage's ledger."""
        now, start = self._now(), self.start
        steps = now["steps"] - start["steps"]
        discarded_steps = discarded_flops = 0
        if rollback is not None:
            # Everything trained in this stage after the restored state was reached is thrown away.
            # The stage's first evaluation may have been recorded in an earlier stage (the state a
            # roll-back returned to), so the stage start bounds what this stage can discard.
            discarded_flops = now["train_flops"] - max(rollback["train_flops"], start["train_flops"])
            discarded_steps = now["steps"] - max(rollback["steps_trained"], start["steps"])
        self.start = self._now()
        return {
            "start_eval": start_eval,
            "end_eval": end_eval,
            "steps_kept": steps - discarded_steps,
            "steps_discarded": discarded_steps,
            "trained_tokens": now["trained_tokens"] - start["trained_tokens"],
            "train_flops": now["train_flops"] - start["train_flops"],
            "discarded_flops": discarded_flops,
            "eval_flops": now["eval_flops"] - start["eval_flops"],
            "seconds": {k: now[k] - start[k] for k in ("train", "eval", "snapshot", "restore")},
        }
