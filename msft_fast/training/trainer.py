"""The step loop: packed micro-batches in, optimizer steps out.

A method (methods/) drives it with `train_until(epochs)`, `evaluate()`, `capture()` and `restore()`
and decides what to keep; the loop itself knows nothing about stages or roll-backs. The rest lives
in modules of its own: evaluation.py, trainer_state.py (counters, schedule, RNG: what a roll-back or
a resume puts back), checkpoint_keeper.py (checkpoints for resume), lookahead.py (DynamixSFT) and
step_stats.py (a step's sums on the host and its metrics.jsonl record).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from typing import Optional

import numpy as np
import torch

from msft_fast.state import checkpoint as ckpt
from msft_fast.training.checkpoint_keeper import CheckpointKeeper
from msft_fast.config import Config, scores_exact_match
from msft_fast.data.loader import MixtureLoader
from msft_fast.data.tasks import TaskData
from msft_fast.runtime.distributed import DistContext, all_reduce_sum, parallelize, reshard_all, set_gradient_sync
from msft_fast.errors import StopRequested, UserError
from msft_fast.training.evaluation import EvalResult, Evaluator, call_with_full_model
from msft_fast.training.exact_match import ExactMatch
from msft_fast.runtime.fault_injection import fault_point
from msft_fast.flops import FlopCounter, device_peak_flops
from msft_fast.training.lookahead import lookahead
from msft_fast.model import CausalLMWithTaskLoss, LoadedModel, LossOptions, decoder_blocks
from msft_fast.training.optim import build_optimizer, build_scheduler
from msft_fast.training.progress import make_progress
from msft_fast.state.snapshot import Snapshot, SnapshotPool
from msft_fast.training.step_stats import WaitingStepRecords, doc_means, peak_memory_gib, read_to_host, task_means
from msft_fast.training.step_timer import PhaseTimer
from msft_fast.state.trackers import Trackers
from msft_fast.training.trainer_state import (Counters, capture_position, checkpoint_state, load_checkpoint_state,
                                     return_to_position, set_rng_state, set_schedule)


METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("msft_fast")


class TrainingDiverged(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""

    all_ranks = True  # every rank judges the same reduced loss and norm: rank 0 alone prints it


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
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.loader = loader
        self.counters = Counters()
        self.evaluator = Evaluator(cfg, ctx, self.model, tasks, loader, self.flop_counter, self.exact_match,
                                   self.param_dtype)
        self.output_dir = output_dir
        self.metrics_path = os.path.join(output_dir, METRICS_FILE)
        self.checkpoints = CheckpointKeeper(ctx, output_dir, cfg.train.keep_checkpoints, self.metrics_path)
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
        self._adopted: dict[int, Snapshot] = {}  # the resumed checkpoint's snapshot states, by uid
        self._unlogged = WaitingStepRecords(ctx.world_size, self.peak_flops)  # steps whose time marks have not passed

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
        self.forward_backward(batches, scale, stats, docs, slots)
        grad_norm = self.clip_gradients()
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
            self.doc_loss_observer(*self.loader.documents_of(plans), doc_means(host[3 * T + 1: 3 * T + 1 + 2 * n_docs]))
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
            "tasks": task_means(self.task_names, loss_sums, token_counts, correct),
        }
        self._unlogged.add(record, timer, step_flops, host_seconds)
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

    def forward_backward(self, batches: list, scale: float, stats: torch.Tensor, docs: torch.Tensor,
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

    def forward_sums(self, batches: list, stats: torch.Tensor, docs: torch.Tensor, slots: list) -> None:
        """Forward only, adding the sums into stats [3, T] and docs [2, D] as `forward_backward` does."""
        with torch.no_grad():
            for batch, slot in zip(batches, slots):
                _add_stats(stats, docs, self.model(batch, per_document=True), slot)
        reshard_all(self.model)  # a forward without backward leaves the root (and the last block) unsharded

    def clip_gradients(self) -> torch.Tensor:
        """Clip to train.grad_clip; the global gradient norm before clipping (a device scalar)."""
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def lookahead(self, plans: list) -> tuple[np.ndarray, np.ndarray]:
        """Each document's mean token loss before and after a virtual, undone step on `plans` (lookahead.py)."""
        return lookahead(self, plans)

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
        # The loaded groups carry the checkpoint's lr: the schedule's own goes back in.
        set_schedule(self.scheduler, self.optimizer, self.scheduler.state_dict())
        c.bad_restores += 1
        c.bad_in_row = 0
        if self.ctx.is_main:
            log.warning("restored weights and optimizer state from %s after %d non-finite steps", path, t.max_bad_steps)

    def log_finished_steps(self, wait: bool = False) -> None:
        """Complete and log the records of steps whose time marks have passed (all of them, waiting
        for the device if needed, when `wait`). Called at sync points, so it never adds one."""
        for record in self._unlogged.finished(wait):
            self._log_step(record)

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
    # Evaluation (evaluation.py): every task's validation split, and generated answers when scored

    def evaluate(self) -> EvalResult:
        t0 = time.perf_counter()
        result = self.evaluator.evaluate(self.optimizer, self.counters)
        self.log_finished_steps()  # the training steps before this pass are done on the device
        self.counters.eval_seconds += time.perf_counter() - t0
        if self.progress is not None:
            self.progress.evaluation(time.perf_counter() - t0)
        return result

    def exact_match_setup(self) -> Optional[dict]:
        return self.evaluator.exact_match_setup()

    def max_generation_flops(self) -> int:
        return self.evaluator.max_generation_flops()

    def call_with_full_model(self, fn):
        """Run `fn(hf_model)` with every rank's weights gathered; every rank must call this together."""
        return call_with_full_model(self.model, fn)

    # -------------------------------------------------------------------------------------------
    # Roll-back targets a method keeps in the snapshot pool (host copies of this rank's shards, no
    # collective) with the position that goes with them (trainer_state.py)

    def make_pool(self, capacity: int, with_optimizer: bool, in_memory: Optional[int] = None,
                  spill_dir: Optional[str] = None) -> SnapshotPool:
        if spill_dir is not None:  # each rank spills its own shards; the folder is this run's alone
            run = f"{os.path.basename(self.output_dir)}-{hashlib.sha1(self.output_dir.encode()).hexdigest()[:8]}"
            spill_dir = os.path.join(spill_dir, run, f"rank-{self.ctx.rank}")
        self.pool = SnapshotPool(capacity, self.ctx.device, with_optimizer, in_memory, spill_dir)
        self._adopted = self.checkpoints.adopt_snapshots(self.pool)
        return self.pool

    def capture(self) -> Snapshot:
        position = capture_position(self.counters, self.loader, self.scheduler, self.ctx.device)
        return self.pool.retain(self.pool.capture(self.model, self.optimizer, position))

    def restore(self, snap: Snapshot, weights_only: bool = False) -> None:
        """Back to a captured state: weights, data position and schedule; optimizer state and RNG
        too unless `weights_only` (then the optimizer starts fresh, as in the mSFT paper's code).
        What was spent (FLOPs, tokens, seconds) is not rolled back."""
        self.pool.restore(snap, self.model, None if weights_only else self.optimizer)
        if weights_only:
            self.optimizer.state.clear()
        return_to_position(snap.extra, self.counters, self.loader, self.scheduler, self.optimizer, self.ctx.device,
                           with_rng=not weights_only)

    def set_active(self, active: list[int]) -> None:
        """Train on these tasks from now on, keeping the position in epochs: one epoch is one pass
        over every active task's data, so the new mixture continues where the old one was."""
        position = self.epoch_position
        self.loader.set_active(active)
        c = self.counters
        c.epoch = math.floor(position + 1e-9)
        c.step_in_epoch = self.loader.last_step_of(c.epoch, position)

    # -------------------------------------------------------------------------------------------
    # Checkpoints (on disk, for resume: checkpoint_keeper.py) of everything above plus the method's state

    def save_checkpoint(self, asynchronous: Optional[bool] = None) -> Optional[str]:
        """Write a resumable checkpoint with every rank; its folder (None while an asynchronous one is
        still being written, or when the write failed: that is logged, the previous checkpoint stays
        the newest, training goes on)."""
        self.finish_checkpoint()  # one in flight at a time: the previous one completes first
        self.log_finished_steps(wait=True)  # metrics.jsonl up to this step belongs to the checkpoint
        return self.checkpoints.save(self.counters, self.model, self.optimizer,
                                     checkpoint_state(self.counters, self.scheduler, self.loader, self.tags),
                                     self.method_state, self.pool, self.history_data(),
                                     self.cfg.train.checkpoint_async if asynchronous is None else asynchronous)

    def finish_checkpoint(self) -> Optional[str]:
        """Complete an asynchronous checkpoint still being written (a no-op when there is none)."""
        return self.checkpoints.finish(self.counters)

    def resume_from(self, path: str) -> dict:
        """Load a checkpoint into this trainer (model, optimizer, schedule, position, RNG); returns
        the history it holds. The method's state follows through `make_pool` + `resumed_method_state`."""
        loaded = self.checkpoints.load(path, self.model, self.optimizer)
        self.counters, self.tags = load_checkpoint_state(loaded.trainer_state, self.scheduler, self.optimizer,
                                                         self.loader)
        set_rng_state(loaded.rank_state, self.ctx.device)
        if self.progress is not None:
            self.progress.resumed(self.counters.steps_trained, len(loaded.history.get("evals", [])))
        return loaded.history

    def resumed_method_state(self):
        """The method's state from the checkpoint this run resumed from (None for a fresh run).
        Call after `make_pool`, which adopts the checkpoint's snapshot states."""
        return self.checkpoints.method_state(self._adopted)

    def close(self) -> None:
        try:
            self.log_finished_steps(wait=True)
        except RuntimeError as e:  # a device in a failed state must not hide the error that ended the run
            log.warning("the timings of the last %d step(s) could not be read: %s", len(self._unlogged), e)
        if self.progress is not None:
            self.progress.close()
        if self.pool is not None and self.pool.spill_dir is not None:
            shutil.rmtree(self.pool.spill_dir, ignore_errors=True)


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
