"""The step loop: packed micro-batches in, optimizer steps out; plus the packed evaluation pass.

A method (SFT now; mSFT and SRO later) drives it with `train_until(epochs)` and `evaluate()` and
decides what to keep; the loop itself knows nothing about stages or roll-backs.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from msft_fast import checkpoint as ckpt
from msft_fast.config import Config, scores_exact_match
from msft_fast.data.loader import MixtureLoader
from msft_fast.data.tasks import TaskData
from msft_fast.distributed import DistContext, all_reduce_sum, parallelize, reshard_all, set_gradient_sync, unshard
from msft_fast.errors import StopRequested, UserError
from msft_fast.exact_match import ExactMatch, ExactMatchCounts
from msft_fast.fault_injection import fault_point
from msft_fast.flops import FlopCounter, device_peak_flops
from msft_fast.generation import ShardedGenerator
from msft_fast.model import CausalLMWithTaskLoss, LoadedModel, LossOptions, decoder_blocks
from msft_fast.optim import build_optimizer, build_scheduler
from msft_fast.progress import make_progress
from msft_fast.snapshot import Snapshot, SnapshotPool, local_world_size, sharded_params
from msft_fast.step_timer import PhaseTimer
from msft_fast.trackers import Trackers


METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("msft_fast")


class TrainingDiverged(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""

    all_ranks = True  # every rank judges the same reduced loss and norm: rank 0 alone prints it


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


@dataclass
class Counters:
    """Everything the run has spent so far (global over ranks)."""

    step: int = 0  # optimizer steps behind the current weights (rolls back with them)
    steps_trained: int = 0  # optimizer steps ever taken (never rolls back)
    epoch: int = 0  # current epoch of the active mixture
    step_in_epoch: int = 0
    train_flops: int = 0
    kept_train_flops: int = 0  # of those, the steps behind the current weights (rolls back with them)
    eval_flops: int = 0
    trained_tokens: int = 0  # tokens through forward + backward
    loss_tokens: int = 0  # of those, tokens with a label
    eval_tokens: int = 0
    generated_tokens: int = 0  # by exact-match evaluations; their FLOPs and time are in eval_*
    generation_flops: int = 0
    generation_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    bad_steps: int = 0  # steps whose update was skipped: non-finite loss or gradient norm
    bad_in_row: int = 0
    bad_restores: int = 0  # recoveries from the newest checkpoint after max_bad_steps in a row
    checkpoint_seconds: float = 0.0
    lookahead_flops: int = 0  # of train_flops, virtual steps that were undone (DynamixSFT's look-ahead)
    lookahead_tokens: int = 0


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, loaded: LoadedModel, tasks: list[TaskData],
                 loader: MixtureLoader, output_dir: str):
        self.cfg, self.ctx, self.tasks = cfg, ctx, tasks
        self.task_names = [t.name for t in tasks]
        self.tokenizer = loaded.tokenizer
        self.tags: dict = {}  # added to every metrics.jsonl record (a method's stage, say)
        self.flop_counter = FlopCounter.for_model(loaded.model)
        self.peak_flops = device_peak_flops(ctx.device, loaded.compute_dtype, cfg.train.peak_tflops)
        self.model = CausalLMWithTaskLoss(loaded.model, len(tasks), LossOptions.from_config(cfg.model))
        self.param_dtype = loaded.compute_dtype
        # Prompts and references of generated-answer scoring, checked before the model is sharded.
        self.exact_match = ExactMatch(cfg, tasks, loaded.tokenizer, loaded.model) if scores_exact_match(cfg) else None
        t = cfg.train
        parallelize(self.model, decoder_blocks(loaded.model), self.param_dtype, ctx.device,
                    activation_checkpointing=t.activation_checkpointing,
                    checkpoint_every=t.activation_checkpointing_every, compile=t.compile, replicas=t.hsdp_replicas,
                    fsdp=t.fsdp)
        self.generator = ShardedGenerator(self.model, self.param_dtype, ctx.device, ctx.world_size) \
            if self.exact_match is not None else None
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.loader = loader
        self.counters = Counters()
        self._eval_batches = None
        self._eval_flops_per_pass, self._eval_tokens_per_pass = self._eval_cost()
        self.output_dir = output_dir
        self.metrics_path = os.path.join(output_dir, METRICS_FILE)
        self.total_steps = 0
        self.scheduler = None
        self.progress = None
        self.pool: Optional[SnapshotPool] = None
        self.trackers = Trackers()  # train.report_to, on rank 0 (set by the run)
        # Checkpoints: the method keeps its resumable state here; `history_data` gives the run's history.
        self.method_state = None
        self.history_data = lambda: {}
        self.stop_signal: Optional[str] = None  # set by a signal handler; acted on after the step
        # A method that follows each document's training loss (IES) sets this: it is called after
        # every step with (task index [D], document index [D], mean token loss [D]) of the step's
        # documents on all ranks, from the step's own loss pass and reduction.
        self.doc_loss_observer = None
        # Called with loader.packing_stats of each epoch plan as training enters it (set by the run).
        self.on_epoch_plan = None
        self._entered_plan: Optional[tuple] = None
        self.last_checkpoint: Optional[str] = None
        self._resumed: Optional[ckpt.LoadedCheckpoint] = None
        self._pending: Optional[ckpt.PendingCheckpoint] = None
        self._unlogged: list[_UnloggedStep] = []  # steps whose time marks have not been read yet

    def set_total_steps(self, total_steps: int, known: bool = True, total_evals: Optional[int] = None) -> None:
        """The lr schedule's horizon in steps. `known=False` when the method cannot tell how many
        steps it will take: the progress then counts without an ETA until the method gives a bound
        (`progress.set_total`, as mSFT does). `total_evals`: the evaluations the run makes, for the ETA."""
        if self.counters.step:
            raise RuntimeError("the schedule is set before the first step")
        self.total_steps = total_steps
        self.scheduler = build_scheduler(self.optimizer, total_steps, self.cfg.train)
        self.progress = make_progress(total_steps if known else None,
                                      enabled=self.ctx.is_main and self.cfg.train.progress,
                                      interval=self.cfg.train.progress_interval,
                                      total_evals=total_evals if known else None)

    # -------------------------------------------------------------------------------------------
    # Position in the data

    @property
    def epoch_position(self) -> float:
        """Epochs of the active mixture trained so far (fractional)."""
        c = self.counters
        return c.epoch + c.step_in_epoch / max(1, self.loader.steps_in_epoch(c.epoch))

    def steps_until(self, target_epochs: float) -> int:
        """Optimizer steps from the current position to `target_epochs` (as train_until takes them)."""
        return self.loader.steps_between(self.counters.epoch, self.counters.step_in_epoch, target_epochs)

    def train_steps(self, n: int) -> None:
        """Take `n` optimizer steps from the current position, into the next epochs as needed."""
        c = self.counters
        for _ in range(n):
            while c.step_in_epoch >= self.loader.steps_in_epoch(c.epoch):
                c.epoch, c.step_in_epoch = c.epoch + 1, 0
            self.train_step()

    def train_until(self, target_epochs: float) -> None:
        c = self.counters
        while True:
            end = self.loader.last_step_of(c.epoch, target_epochs)
            while c.step_in_epoch < end:
                self.train_step()
            if c.step_in_epoch >= self.loader.steps_in_epoch(c.epoch) and target_epochs > c.epoch + 1 - 1e-9:
                c.epoch, c.step_in_epoch = c.epoch + 1, 0
                if target_epochs > c.epoch:
                    continue
            return

    # -------------------------------------------------------------------------------------------
    # One optimizer step

    def train_step(self) -> None:
        """One optimizer step over this rank's micro-batches of the current position.

        The host waits for the device once, at the step's reduction (its statistics, gradient
        norm and stop flag come back in one transfer); nothing else in the step reads device
        memory. The step's time split is taken with device-side marks and logged at the next
        sync point, so the metrics.jsonl line of a step is written one step later (or at the
        next evaluation, checkpoint or the end).
        """
        c, ctx = self.counters, self.ctx
        host_t0 = time.perf_counter()
        self._enter_epoch_plan()
        timer = PhaseTimer.start(ctx.device)
        plans = self.loader.step_plans(c.epoch, c.step_in_epoch)
        batches = [b.to(ctx.device) for b in self.loader.step_batches(c.epoch, c.step_in_epoch)]
        timer.mark("data")
        # Sum of token losses over the whole step, divided by its global count of trained tokens,
        # so the update does not depend on how tokens fall into micro-batches or ranks. FSDP
        # averages gradients over ranks, hence the factor world_size.
        loss_tokens = self.loader.step_loss_tokens(c.epoch, c.step_in_epoch)
        scale = ctx.world_size / max(1, loss_tokens)
        T = len(self.tasks)
        # loss_sum, tokens, correct per task; then a slot that counts ranks asked to stop; then, for a
        # method that follows documents, loss sum and tokens of each of the step's D documents: one
        # reduction per step carries the statistics and the stop decision.
        n_docs = sum(len(p.docs) for p in plans) if self.doc_loss_observer is not None else 0
        reduced = torch.zeros(3 * T + 1 + 2 * n_docs, dtype=torch.float64, device=ctx.device)
        stats, docs = reduced[: 3 * T].view(3, T), reduced[3 * T + 1:].view(2, n_docs)
        slots = self.loader.document_slots(plans) if n_docs else None
        self._forward_backward(batches, scale, stats, docs, slots)
        grad_norm = self._clip_gradients()
        reduced[3 * T] = 1.0 if self.stop_signal else 0.0
        all_reduce_sum(reduced)
        timer.mark("fwd_bwd")
        # The step's one host-device sync: forward, backward, clipping and the reduction are done.
        host = read_to_host(reduced, grad_norm)
        self.log_finished_steps()  # the previous step's marks have passed by now
        loss_sums, token_counts, correct = host[:T], host[T:2 * T], host[2 * T:3 * T]
        stop, grad_norm_value = host[3 * T] > 0, host[-1]
        # The gradient norm is global and the loss is reduced, so every rank takes the same decision.
        finite = math.isfinite(grad_norm_value) and math.isfinite(sum(loss_sums))
        lr = self.scheduler.get_last_lr()[0]
        if n_docs:
            self.doc_loss_observer(*self.loader.documents_of(plans), _doc_means(host[3 * T + 1: 3 * T + 1 + 2 * n_docs]))
        fault_point("train_step")  # gradients computed, weights not yet updated
        if self.pool is not None:
            self.pool.wait()  # a snapshot still copying must read the weights before they change
        if finite:
            self.optimizer.step()
        # A skipped step still consumes its data and its place in the lr schedule, so the run's
        # position stays that of an uninterrupted run.
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark("optimizer")

        tokens = sum(p.num_tokens for p in plans)
        c.step += 1
        c.steps_trained += 1
        c.step_in_epoch += 1
        c.trained_tokens += tokens
        c.loss_tokens += loss_tokens
        step_flops = self.flop_counter.train(tokens, self.loader.doc_lengths(plans))
        c.train_flops += step_flops
        c.kept_train_flops += step_flops
        # Host time: on a GPU the step's wait at its reduction covers the device work queued
        # before it, so consecutive steps' host times add up to the wall time they took.
        host_seconds = time.perf_counter() - host_t0
        c.train_seconds += host_seconds
        record = {
            **self.tags,
            "step": c.step,
            "steps_trained": c.steps_trained,  # never rolls back: the trackers' x axis
            "epoch": round(self.epoch_position, 6),
            "lr": lr,
            "loss": sum(loss_sums) / max(1.0, sum(token_counts)),
            "grad_norm": grad_norm_value,
            "tokens": tokens,
            "loss_tokens": loss_tokens,
            "peak_mem_gib": peak_memory_gib(ctx.device),
            "train_flops": c.train_flops,
            **({} if finite else {"skipped": True}),
            "tasks": {
                name: {"loss": _ratio(loss_sums[i], token_counts[i]), "token_acc": _ratio(correct[i], token_counts[i]),
                       "tokens": int(token_counts[i])}
                for i, name in enumerate(self.task_names) if token_counts[i] > 0
            },
        }
        self._unlogged.append(_UnloggedStep(record, timer, step_flops, host_seconds))
        self._after_step(finite, stop=stop)

    def _enter_epoch_plan(self) -> None:
        """Report a plan of the mixture the first time training steps into it (once per epoch and set
        of active tasks; a method's sampler plans steps by its own rule and is not reported)."""
        key = (self.counters.epoch, self.loader.active)
        if self.on_epoch_plan is None or key == self._entered_plan or self.loader.sampler is not None:
            return
        self._entered_plan = key
        stats = self.loader.packing_stats(self.counters.epoch)
        self.on_epoch_plan({**stats, **({"stage": self.tags["stage"]} if "stage" in self.tags else {})})

    def _forward_backward(self, batches: list, scale: float, stats: torch.Tensor, docs: torch.Tensor,
                          slots: Optional[list]) -> None:
        """Forward and backward over this rank's micro-batches, the loss sum scaled by `scale`; adds
        their per-task loss sum, tokens and hits into stats [3, T] and, with `slots` (this rank's
        micro-batches' document positions, loader.document_slots), each document's loss sum and tokens
        into docs [2, D]."""
        for i, batch in enumerate(batches):
            # Gradients are reduced across ranks once, after the last micro-batch (train.grad_sync).
            set_gradient_sync(self.model, last_micro_batch=i == len(batches) - 1, mode=self.cfg.train.grad_sync)
            out = self.model(batch, per_document=True) if slots is not None else self.model(batch)
            (out[0] * scale).backward()
            _add_stats(stats, docs, out, None if slots is None else slots[i])

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to train.grad_clip; the global gradient norm before clipping (a device scalar)."""
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def lookahead(self, plans: list) -> tuple[np.ndarray, np.ndarray]:
        """A virtual optimizer step on `plans` (all ranks' micro-batches of one step), undone: each
        document's mean token loss [D] (in loader.documents_of(plans) order) before the step, from
        the forward of its backward, and after it, from one more forward; then every rank goes back
        to the state before (weights, optimizer, schedule, RNG; bitwise, through the snapshot pool,
        which must keep optimizer state). The step is the run's own (clipping, AdamW at the current
        lr, gradient sync). Its FLOPs (fwd + bwd + fwd) and time count as training, never as kept."""
        if self.pool is None or not self.pool.with_optimizer:
            raise RuntimeError("a look-ahead needs a snapshot pool that keeps the optimizer state")
        c, ctx, T = self.counters, self.ctx, len(self.tasks)
        t0 = time.perf_counter()
        base = self.capture()
        batches = [b.to(ctx.device) for b in self.loader.batches_of(plans)]
        slots = self.loader.document_slots(plans)
        n_docs = sum(len(p.docs) for p in plans)
        # Per-task and per-document sums before (row 0) and after (row 1) the step: one reduction.
        both = torch.zeros(2, 3 * T + 2 * n_docs, dtype=torch.float64, device=ctx.device)
        before, after = both[0], both[1]
        self._forward_backward(batches, ctx.world_size / max(1, self.loader.loss_tokens_of(plans)),
                               before[:3 * T].view(3, T), before[3 * T:].view(2, n_docs), slots)
        grad_norm = self._clip_gradients()
        self.pool.wait()  # the capture must have read the weights before they change
        if math.isfinite(grad_norm.item()):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for batch, slot in zip(batches, slots):
                _add_stats(after[:3 * T].view(3, T), after[3 * T:].view(2, n_docs),
                           self.model(batch, per_document=True), slot)
        reshard_all(self.model)  # a forward without backward leaves the root (and the last block) unsharded
        all_reduce_sum(both)
        host = read_to_host(before[3 * T:], after[3 * T:])
        self.restore(base)
        self.pool.release(base)
        tokens = sum(p.num_tokens for p in plans)
        lengths = self.loader.doc_lengths(plans)
        flops = self.flop_counter.train(tokens, lengths) + self.flop_counter.eval(tokens, lengths)
        c.train_flops += flops
        c.lookahead_flops += flops
        c.lookahead_tokens += tokens
        c.train_seconds += time.perf_counter() - t0
        return _doc_means(host[:2 * n_docs]), _doc_means(host[2 * n_docs:])

    def _after_step(self, finite: bool, stop: bool) -> None:
        c, t = self.counters, self.cfg.train
        if not finite:
            c.bad_steps += 1
            c.bad_in_row += 1
            if self.ctx.is_main:
                log.warning("step %d: non-finite loss or gradient norm; update skipped (%d in a row)",
                            c.steps_trained, c.bad_in_row)
            if c.bad_in_row >= t.max_bad_steps:
                self._recover_from_bad_steps()
        else:
            c.bad_in_row = 0
        if stop:
            path = self.save_checkpoint(asynchronous=False)
            raise StopRequested(self.stop_signal or "a signal on another rank", c.steps_trained, path)
        if t.checkpoint_every and c.steps_trained % t.checkpoint_every == 0:
            self.save_checkpoint()

    def _recover_from_bad_steps(self) -> None:
        c, t = self.counters, self.cfg.train
        self.finish_checkpoint()
        path = ckpt.latest_checkpoint(self.output_dir)
        if t.on_bad_steps == "stop" or path is None:
            why = "" if t.on_bad_steps == "stop" else " and no checkpoint to restore exists yet"
            raise TrainingDiverged(
                f"{c.bad_in_row} optimizer steps in a row (up to step {c.steps_trained}) had a non-finite loss or "
                f"gradient norm{why}; lower train.lr, raise train.warmup_steps or check the data (train.max_bad_steps="
                f"{t.max_bad_steps}, train.on_bad_steps={t.on_bad_steps})")
        # Back to the newest checkpoint's weights and optimizer state; the data position and the
        # schedule go on, so the batches that diverged are not seen again.
        ckpt.load_weights_and_optimizer(path, self.model, self.optimizer)
        self._set_schedule(self.scheduler.state_dict())  # the loaded groups carry the checkpoint's lr
        c.bad_restores += 1
        c.bad_in_row = 0
        if self.ctx.is_main:
            log.warning("restored weights and optimizer state from %s after %d non-finite steps", path, t.max_bad_steps)

    def log_finished_steps(self, wait: bool = False) -> None:
        """Complete and log the records of steps whose time marks have passed (all of them, waiting
        for the device if needed, when `wait`). Called at sync points, so it never adds one."""
        while self._unlogged and (wait or self._unlogged[0].timer.ready()):
            done = self._unlogged.pop(0)
            done.timer.wait()
            self._log_step(done.complete(self.ctx.world_size, self.peak_flops))

    def _log_step(self, record: dict) -> None:
        if not self.ctx.is_main:
            return
        if record["step"] % self.cfg.train.log_every == 0 or record["step"] == self.total_steps:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log_step(record)
        if self.progress is not None:
            self.progress.step(record)

    # -------------------------------------------------------------------------------------------
    # Evaluation: one packed forward over every task's validation split

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        t0 = time.perf_counter()
        if self._eval_batches is None:
            self._eval_batches = [b.to(self.ctx.device) for b in self.loader.eval_batches()]
        self.model.eval()
        stats = torch.zeros(3, len(self.tasks), dtype=torch.float64, device=self.ctx.device)
        for batch in self._eval_batches:
            _, s = self.model(batch)
            stats[0] += s.loss_sum.double()
            stats[1] += s.tokens.double()
            stats[2] += s.correct.double()
        fault_point("evaluate")
        reshard_all(self.model)  # a forward without backward leaves the root (and the last block) unsharded
        answers = self._score_answers() if self.exact_match is not None else None
        self.model.train()
        all_reduce_sum(stats)
        stats = stats.cpu()
        self.log_finished_steps()  # the training steps before this pass are done on the device
        c = self.counters
        flops = self._eval_flops_per_pass + (answers.flops if answers is not None else 0)
        c.eval_flops += flops
        c.eval_tokens += self._eval_tokens_per_pass
        if answers is not None:
            c.generated_tokens += answers.generated_tokens
            c.generation_flops += answers.flops
            c.generation_seconds += answers.seconds
        c.eval_seconds += time.perf_counter() - t0
        if self.progress is not None:
            self.progress.evaluation(time.perf_counter() - t0)
        tasks = {
            name: TaskScore(_ratio(stats[0, i], stats[1, i]), _ratio(stats[2, i], stats[1, i]), int(stats[1, i]))
            for i, name in enumerate(self.task_names)
        }
        if answers is not None:
            for i, score in enumerate(tasks.values()):
                score.exact_match = answers.accuracy(i)
                score.answers, score.answers_correct = answers.answers[i], answers.correct[i]
        return EvalResult(tasks, _ratio(stats[0].sum(), stats[1].sum()), _ratio(stats[2].sum(), stats[1].sum()),
                          flops, answers)

    def _score_answers(self) -> ExactMatchCounts:
        """Greedy answers to every validation prompt, each rank its share (exact_match.py)."""
        gen = self.generator
        if gen.choice is None:
            # Decided at the first evaluation, with the AdamW state still to come counted as taken
            # (two fp32 tensors per parameter shard), so that later evaluations fit too.
            adam = 0 if self.optimizer.state else 2 * sum(p.numel() * 4 for p in sharded_params(self.model))
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

    def call_with_full_model(self, fn):
        """Run `fn(hf_model)` with every rank's weights gathered for the HF model's own forward
        (e.g. `generate` in a user metric); every rank must call this together."""
        unshard(self.model)  # the root (embeddings, head); the blocks gather in their own hooks
        try:
            with torch.no_grad():
                return fn(self.model.lm)
        finally:
            reshard_all(self.model)

    def _eval_cost(self) -> tuple[int, int]:
        lengths = [int(n) for t in self.tasks for n in t.val.lengths]
        return self.flop_counter.eval(sum(lengths), lengths), sum(lengths)

    # -------------------------------------------------------------------------------------------
    # State a method may keep and restore (host copies of this rank's shards, no collective)

    def make_pool(self, capacity: int, with_optimizer: bool, in_memory: Optional[int] = None,
                  spill_dir: Optional[str] = None) -> SnapshotPool:
        if spill_dir is not None:  # each rank spills its own shards; the folder is this run's alone
            spill_dir = os.path.join(spill_dir, f"{os.path.basename(self.output_dir)}-{_short_hash(self.output_dir)}",
                                     f"rank-{self.ctx.rank}")
        self.pool = SnapshotPool(capacity, self.ctx.device, with_optimizer, in_memory, spill_dir)
        self._adopted = {}
        if self._resumed is not None and self._resumed.rank_state["pool"] is not None:
            self._adopted = self.pool.load_state_dict(self._resumed.rank_state["pool"])
        return self.pool

    def capture(self) -> Snapshot:
        c = self.counters
        extra = {
            "position": (c.step, c.epoch, c.step_in_epoch, c.kept_train_flops),
            "active": self.loader.active,
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None,
        }
        return self.pool.retain(self.pool.capture(self.model, self.optimizer, extra))

    def restore(self, snap: Snapshot, weights_only: bool = False) -> None:
        """Back to a captured state: weights, data position and schedule; optimizer state and RNG
        too unless `weights_only` (then the optimizer starts fresh, as in the mSFT paper's code).
        What was spent (FLOPs, tokens, seconds) is not rolled back."""
        self.pool.restore(snap, self.model, None if weights_only else self.optimizer)
        if weights_only:
            self.optimizer.state.clear()
        c = self.counters
        c.step, c.epoch, c.step_in_epoch, c.kept_train_flops = snap.extra["position"]
        self.loader.set_active(snap.extra["active"])
        self._set_schedule(snap.extra["scheduler"])
        if not weights_only:
            torch.set_rng_state(snap.extra["rng"])
            if snap.extra["cuda_rng"] is not None:
                torch.cuda.set_rng_state(snap.extra["cuda_rng"], self.ctx.device)

    def _set_schedule(self, state: dict) -> None:
        """The lr schedule at a position, and the optimizer's lr with it: loading a scheduler's state
        sets what it reports, not the lr the optimizer's groups will use for the next step (that is
        written only by scheduler.step()), so the first step after a roll-back would take the lr of
        the step before it."""
        self.scheduler.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def set_active(self, active: list[int]) -> None:
        """Train on these tasks from now on, keeping the position in epochs: one epoch is one pass
        over every active task's data, so the new mixture continues where the old one was."""
        position = self.epoch_position
        self.loader.set_active(active)
        c = self.counters
        c.epoch = math.floor(position + 1e-9)
        c.step_in_epoch = self.loader.last_step_of(c.epoch, position)

    # -------------------------------------------------------------------------------------------
    # Checkpoints (on disk, for resume) of everything above plus the method's state

    def save_checkpoint(self, asynchronous: Optional[bool] = None) -> Optional[str]:
        """Write a resumable checkpoint with every rank; its folder (None while an asynchronous one is
        still being written, or when the write failed: that is logged, the previous checkpoint stays
        the newest, training goes on)."""
        if asynchronous is None:
            asynchronous = self.cfg.train.checkpoint_async
        self.finish_checkpoint()  # one in flight at a time: the previous one completes first
        self.log_finished_steps(wait=True)  # metrics.jsonl up to this step belongs to the checkpoint
        c, t0 = self.counters, time.perf_counter()
        trainer_state = {
            "counters": dataclasses.asdict(c),
            "scheduler": self.scheduler.state_dict(),
            "active": self.loader.active,
            "tags": dict(self.tags),
        }
        rank_state = {
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None,
            "pool": self.pool.state_dict() if self.pool is not None else None,
        }
        metrics_bytes = os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0
        try:
            path = ckpt.save_checkpoint(self.ctx, self.output_dir, c.steps_trained, self.model, self.optimizer,
                                        trainer_state, self.method_state, rank_state, self.history_data(),
                                        metrics_bytes, self.cfg.train.keep_checkpoints, asynchronous)
        except ckpt.CheckpointError as e:
            self._checkpoint_failed(e)
            return None
        finally:
            c.checkpoint_seconds += time.perf_counter() - t0
        if isinstance(path, ckpt.PendingCheckpoint):
            self._pending = path
            return None
        self.last_checkpoint = path
        return path

    def finish_checkpoint(self) -> Optional[str]:
        """Complete an asynchronous checkpoint still being written (a no-op when there is none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        t0 = time.perf_counter()
        try:
            self.last_checkpoint = ckpt.finish_checkpoint(self.ctx, pending)
            return self.last_checkpoint
        except ckpt.CheckpointError as e:
            self._checkpoint_failed(e)
            return None
        finally:
            self.counters.checkpoint_seconds += time.perf_counter() - t0

    def _checkpoint_failed(self, error: Exception) -> None:
        if self.ctx.is_main:
            log.error("%s; the previous checkpoint (%s) is intact; training goes on", error,
                      self.last_checkpoint or "none")

    def resume_from(self, path: str) -> dict:
        """Load a checkpoint into this trainer (model, optimizer, schedule, position, RNG); returns
        the history it holds. The method's state follows through `make_pool` + `resumed_method_state`."""
        loaded = ckpt.load_checkpoint(self.ctx, path, self.model, self.optimizer)
        st = loaded.trainer_state
        self.counters = Counters(**st["counters"])
        self._set_schedule(st["scheduler"])
        self.loader.set_active(st["active"])
        self.tags = dict(st["tags"])
        torch.set_rng_state(loaded.rank_state["rng"])
        if loaded.rank_state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(loaded.rank_state["cuda_rng"], self.ctx.device)
        if self.ctx.is_main:  # lines logged after the checkpoint are logged again by the resumed run
            if os.path.exists(self.metrics_path):
                os.truncate(self.metrics_path, min(loaded.meta["metrics_bytes"], os.path.getsize(self.metrics_path)))
        if self.progress is not None:
            self.progress.resumed(self.counters.steps_trained, len(loaded.history.get("evals", [])))
        self._resumed = loaded
        self.last_checkpoint = path
        return loaded.history

    def resumed_method_state(self):
        """The method's state from the checkpoint this run resumed from (None for a fresh run).
        Call after `make_pool`, which adopts the checkpoint's snapshot states."""
        if self._resumed is None:
            return None
        snapshots = self._adopted if self.pool is not None else {}
        return self._resumed.method_state(snapshots)

    def close(self) -> None:
        try:
            self.log_finished_steps(wait=True)
        except RuntimeError as e:  # a device in a failed state must not hide the error that ended the run
            log.warning("the timings of the last %d step(s) could not be read: %s", len(self._unlogged), e)
        if self.progress is not None:
            self.progress.close()
        if self.pool is not None and self.pool.spill_dir is not None:
            shutil.rmtree(self.pool.spill_dir, ignore_errors=True)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _ratio(num, den) -> float:
    """num / den for host numbers or tensors already on the host; NaN when den is 0."""
    return float(num) / float(den) if float(den) > 0 else float("nan")


def _add_stats(stats: torch.Tensor, docs: torch.Tensor, out: tuple, slot: Optional[np.ndarray]) -> None:
    """Add a micro-batch's per-task sums (out[1]) into stats [3, T] and, when it has documents of the
    step (`slot`: their positions), its per-document sums (out[2]) into docs [2, D]."""
    s = out[1]
    stats[0] += s.loss_sum.double()
    stats[1] += s.tokens.double()
    stats[2] += s.correct.double()
    if slot is not None:
        at = torch.from_numpy(slot).to(docs.device, non_blocking=True)
        docs[0].index_add_(0, at, out[2].loss_sum.double())
        docs[1].index_add_(0, at, out[2].tokens.double())


def _doc_means(sums_then_tokens: list[float]) -> np.ndarray:
    """[D] mean token loss per document from D loss sums followed by D token counts (NaN without tokens)."""
    v = np.asarray(sums_then_tokens, dtype=np.float64).reshape(2, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(v[1] > 0, v[0] / np.maximum(v[1], 1), np.nan)


def read_to_host(*tensors: torch.Tensor) -> list[float]:
    """The values of `tensors` (any shapes) as one flat list of Python floats, in one device-to-host
    transfer: the step loop's only host-device sync."""
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).tolist()


@dataclass
class _UnloggedStep:
    """A step's metrics record, waiting for its time marks to pass on the device."""

    record: dict
    timer: PhaseTimer
    flops: int
    host_seconds: float

    def complete(self, world_size: int, peak_flops: Optional[float]) -> dict:
        split = self.timer.seconds()
        dt = max(sum(split.values()), 1e-9)
        r = self.record
        r.update({
            "tokens_per_s": r["tokens"] / dt,
            "tokens_per_s_per_device": r["tokens"] / dt / world_size,
            **({"mfu": self.flops / (dt * peak_flops * world_size)} if peak_flops else {}),
            "step_seconds": dt,
            "host_seconds": self.host_seconds,
            "time": split,
        })
        return r

