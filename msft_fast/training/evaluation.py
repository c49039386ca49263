"""Evaluation: one packed forward over every task's validation split (loss, token accuracy) and, when
exact match is scored, greedy answers to every validation prompt (exact_match.py, generation.py).

The trainer calls `Evaluator.evaluate`, which books its FLOPs and tokens in the counters; every rank
must call it together.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from msft_fast.config import Config
from msft_fast.data.loader import MixtureLoader
from msft_fast.data.tasks import TaskData
from msft_fast.runtime.distributed import DistContext, all_reduce_sum, reshard_all, unshard
from msft_fast.training.exact_match import ExactMatch, ExactMatchCounts
from msft_fast.runtime.fault_injection import fault_point
from msft_fast.flops import FlopCounter
from msft_fast.training.generation import ShardedGenerator
from msft_fast.state.snapshot import local_world_size, sharded_params
from msft_fast.training.step_stats import ratio
from msft_fast.training.trainer_state import Counters

log = logging.getLogger("msft_fast")


@dataclass
class TaskScore:
    loss: float  # mean token loss
    token_acc: float  # teacher-forced next-token accuracy
    tokens: int
    exact_match: Optional[float] = None  # share of generated answers equal to the reference (when scored)
    answers: int = 0  # validation rows answered
    answers_correct: int = 0


@dataclass
class EvalResult:
    tasks: dict[str, TaskScore]
    pooled_loss: float  # token-weighted over all tasks
    pooled_token_acc: float
    flops: int  # the packed pass, plus generation when answers are scored
    exact_match: Optional[ExactMatchCounts] = None  # generated answers, when scored


class Evaluator:
    """Scores the trainer's sharded model on the validation splits. `exact_match` (None when answers are
    not scored) is built by the trainer before it shards the model, so bad prompts stop the run early."""

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, tasks: list[TaskData],
                 loader: MixtureLoader, flop_counter: FlopCounter, exact_match: Optional[ExactMatch],
                 param_dtype: torch.dtype):
        self.cfg, self.ctx, self.model, self.loader = cfg, ctx, model, loader
        self.task_names = [t.name for t in tasks]
        self.flop_counter = flop_counter
        self.exact_match = exact_match
        self.generator = ShardedGenerator(model, param_dtype, ctx.device, ctx.world_size) \
            if exact_match is not None else None
        self._batches = None  # the packed validation batches, on the device from the first evaluation
        lengths = [int(n) for t in tasks for n in t.val.lengths]
        self.tokens_per_pass = sum(lengths)
        self.flops_per_pass = flop_counter.eval(self.tokens_per_pass, lengths)

    @torch.no_grad()
    def evaluate(self, optimizer: torch.optim.Optimizer, counters: Counters) -> EvalResult:
        """The packed pass (and the answers), reduced over ranks; the model is back in training mode.
        Its FLOPs and tokens (and the generation's) are added to `counters`; its time is the caller's."""
        if self._batches is None:
            self._batches = [b.to(self.ctx.device) for b in self.loader.eval_batches()]
        self.model.eval()
        stats = torch.zeros(3, len(self.task_names), dtype=torch.float64, device=self.ctx.device)
        for batch in self._batches:
            _, s = self.model(batch)
            stats[0] += s.loss_sum.double()
            stats[1] += s.tokens.double()
            stats[2] += s.correct.double()
        fault_point("evaluate")
        reshard_all(self.model)  # a forward without backward leaves the root (and the last block) unsharded
        answers = self._score_answers(optimizer) if self.exact_match is not None else None
        self.model.train()
        all_reduce_sum(stats)
        stats = stats.cpu()
        tasks = {
            name: TaskScore(ratio(stats[0, i], stats[1, i]), ratio(stats[2, i], stats[1, i]), int(stats[1, i]))
            for i, name in enumerate(self.task_names)
        }
        if answers is not None:
            for i, score in enumerate(tasks.values()):
                score.exact_match = answers.accuracy(i)
                score.answers, score.answers_correct = answers.answers[i], answers.correct[i]
        flops = self.flops_per_pass + (answers.flops if answers is not None else 0)
        counters.eval_flops += flops
        counters.eval_tokens += self.tokens_per_pass
        if answers is not None:
            counters.generated_tokens += answers.generated_tokens
            counters.generation_flops += answers.flops
            counters.generation_seconds += answers.seconds
        return EvalResult(tasks, ratio(stats[0].sum(), stats[1].sum()), ratio(stats[2].sum(), stats[1].sum()),
                          flops, answers)

    def _score_answers(self, optimizer: torch.optim.Optimizer) -> ExactMatchCounts:
        """Greedy answers to every validation prompt, each rank its share (exact_match.py)."""
        gen = self.generator
        if gen.choice is None:
            # Decided at the first evaluation, with the AdamW state still to come counted as taken
            # (two fp32 tensors per parameter shard), so that later evaluations fit too.
            adam = 0 if optimizer.state else 2 * sum(p.numel() * 4 for p in sharded_params(self.model))
            choice = gen.choose(self.cfg.msft.generation_gather, self.exact_match.batch_tokens, adam,
                                local_world_size())
            if self.ctx.is_main:
                em = self.exact_match
                log.info("exact match: %d validation answers in %d generation batches per evaluation, max_new_tokens %s;"
                         " weights gathered %s (%s)", sum(len(t.prompts) for t in em.tasks), len(em.batches),
                         ", ".join(f"{t.name} {t.max_new_tokens}" for t in em.tasks),
                         "once per evaluation" if choice.mode == "once" else "block by block for every forward",
                         choice.reason)
        with gen.session() as generate:
            return self.exact_match.evaluate(generate, self.ctx.rank, self.ctx.world_size, gen.lockstep,
                                             self.flop_counter, self.ctx.device)

    def exact_match_setup(self) -> Optional[dict]:
        """history.json `exact_match`: what is scored, and how the weights reach generation."""
        if self.exact_match is None:
            return None
        choice = self.generator.choice
        return {**self.exact_match.describe(), "gather": choice.mode if choice else None,
                "gather_reason": choice.reason if choice else None}

    def max_generation_flops(self) -> int:
        """The most one evaluation's generation can cost: every answer runs to max_new_tokens."""
        if self.exact_match is None:
            return 0
        return sum(self.flop_counter.generation([len(p) for p in t.prompts], [t.max_new_tokens] * len(t.prompts))
                   for t in self.exact_match.tasks)


def call_with_full_model(model: torch.nn.Module, fn):
    """Run `fn(model.lm)` with every rank's weights gathered for the HF model's own forward (e.g.
    `generate` in a user metric); every rank must call this together."""
    unshard(model)  # the root (embeddings, head); the blocks gather in their own hooks
    try:
        with torch.no_grad():
            return fn(model.lm)
    finally:
        reshard_all(model)
