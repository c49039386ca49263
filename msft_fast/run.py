"""One training run, start to end: output folder, model, data, trainer, method, export, history.

Everything that can fail on user input (config, output folder, model folder, data) is checked
before the model is moved to a device.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Optional

import yaml

from msft_fast.state.checkpoint import CHECKPOINT_DIR, latest_checkpoint
from msft_fast.config import Config, resolve_path
from msft_fast.attention import run_static_tokens
from msft_fast.data.packing import padding_fraction
from msft_fast.data.tasks import data_warnings, load_tasks
from msft_fast.data.loader import MixtureLoader
from msft_fast.runtime.distributed import (
    DistContext, all_gather_object, broadcast_object, init_distributed, shutdown_distributed,
)
from msft_fast.errors import (
    ConfigError, Interrupted, ModelError, OutputError, StopRequested, UserError, on_every_rank,
)
from msft_fast.state.export import export_hf_folder
from msft_fast.state.history import HISTORY_FILE, History
from msft_fast.hub import pin_commits
from msft_fast.methods.dynamix import run_dynamix
from msft_fast.methods.ies import run_ies
from msft_fast.methods.metric import Metric
from msft_fast.methods.msft import run_msft
from msft_fast.methods.records import eval_points
from msft_fast.methods.sft import run_sft
from msft_fast.methods.sro import run_sro
from msft_fast.model import load_model, load_model_spec, max_positions
from msft_fast.runtime.preflight import preflight_memory
from msft_fast.report import describe_compute, write_report
from msft_fast.state.trackers import TENSORBOARD_DIR, Trackers, check_installed as check_trackers, open_trackers
from msft_fast.training.trainer import METRICS_FILE, Trainer, peak_memory_gib

log = logging.getLogger("msft_fast")

METHODS = {"sft": run_sft, "msft": run_msft, "sro": run_sro, "ies": run_ies, "dynamix": run_dynamix}
FINAL_DIR = "final"
RUN_ARTIFACTS = (HISTORY_FILE, METRICS_FILE, "config.yaml", "curves.png", "report.md", FINAL_DIR, FINAL_DIR + ".tmp",
                 FINAL_DIR + ".old", CHECKPOINT_DIR, TENSORBOARD_DIR)  # wandb/ is W&B's, with other runs in it
REPEAT_WINDOW_S = 1.0  # see _stop_on_signals
# Keys that may change between a run and its resumption: they do not change what is trained.
RESUMABLE_CHANGES = ("train.progress", "train.progress_interval", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.checkpoint_async", "train.peak_tflops",
                     "train.max_bad_steps", "train.on_bad_steps", "data.num_proc", "data.cache_dir", "train.report_to")


def train(cfg: Optional[Config], overwrite: bool = False, config_error: Optional[UserError] = None) -> dict:
    """Run `cfg` in this process (one rank of a torchrun group, or a one-rank group of its own).

    config_error: this rank could not read the config (cfg is None); under torchrun the ranks
    first agree on such errors, so that one line says what is wrong, printed by rank 0 alone.
    """
    # An asynchronous checkpoint writer coordinates its ranks over a CPU (gloo) group.
    ctx = init_distributed(cpu_backend_too=cfg is not None and cfg.train.checkpoint_async)
    box: list[Optional[Trainer]] = [None]
    try:
        with _stop_on_signals(box):
            # A metric callback that does not import fails here, before any work.
            metric = _agreed(ctx, lambda: _metric_of(cfg, config_error))
            return _train(cfg, ctx, overwrite, metric, box)
    except (UserError, StopRequested, Interrupted, KeyboardInterrupt) as e:
        # Reported in one line, never as a traceback: the locals of its frames (the model among them,
        # whose mesh holds the process group) go now, so that shutdown_distributed ends the group.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        box[0] = None
        shutdown_distributed()


def record_epoch_plan(data: dict, stats: dict) -> None:
    """Adds an epoch plan's packing statistics to history.json `packing` (once per epoch and task set:
    a resumed run enters its epoch again) and updates the step-weighted means."""
    packing = data.setdefault("packing", {"mixing_tv": None, "padding": None, "epochs": []})
    epochs = packing["epochs"]
    if any(e["epoch"] == stats["epoch"] and e["tasks"] == stats["tasks"] for e in epochs):
        return
    epochs.append(stats)
    steps = sum(e["steps"] for e in epochs) or 1
    packing["mixing_tv"] = round(sum(e["mixing_tv"] * e["steps"] for e in epochs) / steps, 6)
    packing["padding"] = round(sum(e["padding"] * e["steps"] for e in epochs) / steps, 6)


def _metric_of(cfg: Optional[Config], config_error: Optional[UserError]) -> Metric:
    if config_error is not None:
        raise config_error
    return Metric(cfg.msft.metric)


@contextlib.contextmanager
def _stop_on_signals(box: list):
    """SIGTERM/SIGINT ask the trainer to checkpoint after the current step and stop (all ranks agree
    on it in the step's reduction). Before training starts, or on a second signal, stop at once.

    The same signal again within REPEAT_WINDOW_S counts as the first: a cluster scheduler (SLURM's
    scancel) signals every process of a job, workers included, and torchrun then passes its own
    copy on; that must not cost the checkpoint."""
    first: dict = {}

    def handler(signum, frame):
        trainer_, name = box[0], signal.Signals(signum).name
        if trainer_ is None:
            raise Interrupted(name, "before training started; rerun the same command to start (or resume) the run")
        if trainer_.stop_signal is not None:
            if name == trainer_.stop_signal and time.monotonic() - first.get(name, -math.inf) < REPEAT_WINDOW_S:
                return
            raise Interrupted(name, f"(a second signal, after {trainer_.stop_signal}): stopped at once; rerun the "
                                    "same command to resume from the newest complete checkpoint")
        trainer_.stop_signal = name
        first[name] = time.monotonic()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _train(cfg: Config, ctx: DistContext, overwrite: bool, metric: Metric, box: list) -> dict:
    start = time.time()
    out = resolve_path(cfg.output_dir)
    resume = broadcast_object(_agreed(ctx, lambda: prepare_output_dir(out, overwrite, cfg), main_only=True))
    _agreed(ctx, lambda: check_trackers(cfg.train.report_to), main_only=True)  # only rank 0 logs to them
    # Hub models and datasets are pinned to one commit each by rank 0 (a resumed run keeps the
    # commits it started from), so every rank and node reads the same files; the first rank of
    # each node downloads them while the others wait.
    commits = broadcast_object(_agreed(ctx, lambda: pin_commits(cfg, _resumed_commits(resume)), main_only=True))
    # Everything user input can fail is checked before any weight is read or memory taken: the
    # tokenizer and model config first, then the data against them, then the memory estimate.
    spec = _agreed(ctx, lambda: load_model_spec(cfg.model, cfg.train.precision, ctx.device, cfg.data.chat_template,
                                                commits), main_first=True)
    limit = max_positions(spec.config)
    if limit is not None and cfg.data.max_seq_len > limit:
        raise on_every_rank(ConfigError(f"config key 'data.max_seq_len' ({cfg.data.max_seq_len}) exceeds the model's "
                                        f"position limit ({limit})"))
    # The first rank of each node tokenizes and fills its cache; the others then read that cache.
    tasks = _agreed(ctx, lambda: load_tasks(cfg.data, spec.tokenizer, commits), main_first=True)
    try:
        check_token_ids(tasks, spec.text_config.vocab_size)
    except UserError as e:
        raise on_every_rank(e) from None
    digests = {t.name: {"train": t.train.digest(), "val": t.val.digest()} for t in tasks}
    if resume is not None:
        _agreed(ctx, lambda: _check_same_data(out, resume, digests))
    if ctx.world_size % cfg.train.hsdp_replicas:
        raise on_every_rank(ConfigError(f"config key 'train.hsdp_replicas' ({cfg.train.hsdp_replicas}) must divide "
                                        f"the number of ranks ({ctx.world_size})"))
    # Selective checkpointing is costed as none: the estimate errs on the safe side.
    _agreed(ctx, lambda: preflight_memory(cfg, spec.config, ctx.world_size // cfg.train.hsdp_replicas, ctx.device,
                                          spec.compute_dtype, attention=spec.attn_implementation,
                                          activation_checkpointing=cfg.train.activation_checkpointing == "full"))
    if resume is None:
        _agreed(ctx, lambda: clear_run(out), main_only=True)
    loaded = _agreed(ctx, lambda: load_model(cfg.model, cfg.train.precision, ctx.device, cfg.train.seed, spec))
    static_tokens = run_static_tokens(cfg.data.static_shapes, cfg.data.tokens_per_batch, spec.attn_implementation,
                                      cfg.train.compile)
    loader = MixtureLoader(tasks, cfg.data.tokens_per_batch, cfg.train.seed, ctx.rank, ctx.world_size,
                           cfg.train.grad_accum, static_tokens)
    steps = loader.steps_between(0, 0, cfg.train.epochs)
    if steps == 0:
        raise on_every_rank(ConfigError(
            f"config key 'train.epochs' ({cfg.train.epochs}) gives no optimizer step: one epoch is "
            f"{loader.steps_in_epoch(0)} steps of {loader.per_step} micro-batches"))
    if ctx.is_main:
        with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        for t in tasks:
            log.info("task %-16s train %6d docs  val %5d docs  %s", t.name, len(t.train), len(t.val),
                     " ".join(f"{k}={v}" for k, v in t.counts.items()
                              if v and not k.endswith(("rows", "_docs"))))
        for warning in data_warnings(tasks, cfg.data, spec.tokenizer):
            log.warning("%s", warning)

    trainer_ = None
    try:
        trainer_ = box[0] = Trainer(cfg, ctx, loaded, tasks, loader, output_dir=out)
        # The lr schedule spans train.epochs of the full mixture for every method, so methods see the
        # same learning rate at the same step; mSFT cannot know its length, so it may run past the
        # horizon (at the floor lr) or stop before it.
        evals = 1 + len(eval_points(0.0, cfg.train.epochs, cfg.msft.evals_per_epoch))  # as sft and dynamix make them
        trainer_.set_total_steps(steps, known=cfg.method in ("sft", "dynamix"), total_evals=evals)
        pad = padding_fraction(loader.epoch_plan(0), static_tokens or cfg.data.tokens_per_batch)
        first_plan = loader.packing_stats(0)
        backends = {"attn_implementation": loaded.attn_implementation,
                    "compute_dtype": str(trainer_.param_dtype).removeprefix("torch."),
                    "loss_implementation": trainer_.model.loss_implementation(ctx.device, trainer_.param_dtype)}
        if ctx.is_main:
            log.info("%s: model %s (%s attention, %s compute, %s loss), %d rank%s, lr schedule over %d steps",
                     cfg.method, loaded.source, *backends.values(), ctx.world_size, "" if ctx.world_size == 1 else "s",
                     steps)
            if first_plan is not None:
                log.info("packing: %d micro-batches of %s%d tokens in %d steps per epoch; padding %.2f%% of their "
                         "capacity; mixing: a step's task shares of trained tokens are %.3f from the epoch's "
                         "(mean total-variation distance; 0: every step trains the mixture in its proportions)",
                         first_plan["micro_batches"], "at most " if static_tokens is None else "exactly ",
                         static_tokens or cfg.data.tokens_per_batch, first_plan["steps"],
                         100 * first_plan["padding"], first_plan["mixing_tv"])
        history = History(out, cfg.method, trainer_.task_names, cfg.to_dict(), {
            "metric": metric.name,
            "higher_is_better": metric.higher_is_better,
            "world_size": ctx.world_size,
            "model": loaded.source,
            "hub_commits": {k: v for k, v in commits.items() if v is not None},  # Hub repos by config key
            **backends,
            "padding_fraction": pad,
            # Every micro-batch's token count under data.static_shapes (null: each its own)
            "static_tokens": static_tokens,
            # Every epoch plan training entered (a roll-back or an exclusion plans again), and their
            # step-weighted means: how far steps' task shares are from the epoch's, and padding.
            "packing": {"mixing_tv": None, "padding": None, "epochs": []},
            "data": {t.name: t.counts for t in tasks},
            "data_sources": {t.name: t.sources for t in tasks},
            "data_digests": digests,  # what a resume compares (see _check_same_data)
        })
        if resume is not None:
            history.data = trainer_.resume_from(resume)
            if ctx.is_main:
                log.info("resuming the unfinished run in %s from %s (step %d)", out, resume,
                         trainer_.counters.steps_trained)
        trainer_.trackers = history.trackers = start_trackers(ctx, cfg, out, history, trainer_.counters.steps_trained)
        trainer_.history_data = lambda: history.data
        trainer_.on_epoch_plan = lambda stats: record_epoch_plan(history.data, stats)
        try:
            final = METHODS[cfg.method](trainer_, history, metric)
            trainer_.finish_checkpoint()
        except StopRequested:
            history.data["status"] = "stopped"
            history.write(ctx.is_main)
            raise
        final_dir = os.path.join(out, FINAL_DIR)
        export_hf_folder(trainer_.model, loaded.tokenizer, final_dir, ctx.is_main, loaded.export_dtype)
        c = trainer_.counters
        totals = {
            "train_flops": c.train_flops,
            "eval_flops": c.eval_flops,
            "trained_tokens": c.trained_tokens,
            "loss_tokens": c.loss_tokens,
            "eval_tokens": c.eval_tokens,
            # Exact-match evaluations: generated tokens, their FLOPs and time (inside eval_flops, eval_seconds)
            **({"generated_tokens": c.generated_tokens, "generation_flops": c.generation_flops,
                "generation_seconds": c.generation_seconds} if trainer_.exact_match is not None else {}),
            "steps": c.steps_trained,
            "discarded_flops": sum(st.get("discarded_flops", 0) for st in history.data["stages"]),
            # The steps behind the final weights (the method restored them last); the rest of
            # train_flops went into states the final model does not descend from.
            "final_kept_train_flops": c.kept_train_flops,
            "final_discarded_train_flops": c.train_flops - c.kept_train_flops,
            # Epochs of training over all stages, kept and discarded (each stage records its own).
            "epochs_trained": round(sum(st.get("epochs_trained", 0.0) for st in history.data["stages"]), 6),
            # Of train_flops, DynamixSFT's undone look-ahead steps (0 for the other methods).
            "lookahead_flops": c.lookahead_flops,
            "train_seconds": c.train_seconds,
            "eval_seconds": c.eval_seconds,
            "snapshot_seconds": sum(trainer_.pool.capture_seconds) if trainer_.pool else 0.0,
            "restore_seconds": sum(trainer_.pool.restore_seconds) if trainer_.pool else 0.0,
            "spill_seconds": sum(trainer_.pool.spill_seconds) if trainer_.pool else 0.0,
            "snapshot_spills": len(trainer_.pool.spill_seconds) if trainer_.pool else 0,
            "checkpoint_seconds": c.checkpoint_seconds,
            "bad_steps": c.bad_steps,
            "bad_restores": c.bad_restores,
            "wall_seconds": time.time() - start,
            "tokens_per_s": c.trained_tokens / max(1e-9, c.train_seconds),
            "tokens_per_s_per_device": c.trained_tokens / max(1e-9, c.train_seconds) / ctx.world_size,
            "mfu": (c.train_flops / (c.train_seconds * trainer_.peak_flops * ctx.world_size)
                    if trainer_.peak_flops and c.train_seconds > 0 else None),
            "peak_mem_gib": peak_memory_gib(ctx.device),
        }
        history.finish(final, totals)
        history.write(ctx.is_main)
        if ctx.is_main:
            write_report(out, history.data)
    finally:
        if trainer_ is not None:
            trainer_.trackers.close(failed=sys.exc_info()[0] is not None)
            trainer_.close()
    if ctx.is_main:
        mfu = f", MFU {100 * totals['mfu']:.1f}%" if totals["mfu"] is not None else ""
        log.info("trained %d tokens in %.1f s (%.0f tokens/s, %.0f per device%s), evaluation took %.1f s, peak "
                 "memory %.2f GiB", totals["trained_tokens"], totals["train_seconds"], totals["tokens_per_s"],
                 totals["tokens_per_s_per_device"], mfu, totals["eval_seconds"], totals["peak_mem_gib"])
        log.info("compute: %s", describe_compute(history.data))
        log.info("done: final model (eval %d, pooled %s %.4f) in %s; history in %s; report in %s", final["eval_id"],
                 metric.name, final["pooled_metric"], final_dir, history.path, os.path.join(out, "report.md"))
    return history.data


def _agreed(ctx: DistContext, fn, main_first: bool = False, main_only: bool = False):
    """Run a step that user input can fail, so that a UserError on any rank stops every rank with
    that message before the next collective (no rank is left waiting for one that has quit).

    main_first: the first rank of each node runs first (to fill a download or tokenization cache,
    which is per node), then the others; main_only: only rank 0.
    """
    def attempt():
        try:
            return fn(), None
        except UserError as e:
            return None, e

    def raise_first(errors: list) -> None:
        for rank, e in enumerate(errors):
            if e is not None:
                shared = e if rank == 0 else type(e)(f"on rank {rank}: {e}")
                shared.all_ranks = True
                raise shared

    result, error = None, None
    first = ctx.is_main if main_only else ctx.local_rank == 0
    if main_only or main_first:
        if first:
            result, error = attempt()
        raise_first(all_gather_object(error) if main_first else [broadcast_object(error)])
        if main_only:
            return result
    if not (main_first and first):
        result, error = attempt()
    raise_first(all_gather_object(error))
    return result


def start_trackers(ctx: DistContext, cfg: Config, out: str, history: History, steps_trained: int) -> Trackers:
    """train.report_to's trackers on rank 0 (the other ranks get an empty fan-out). One that cannot
    start (no W&B login) stops every rank with its one line, before the first step."""
    if not cfg.train.report_to:
        return Trackers()
    opened = _agreed(ctx, lambda: open_trackers(cfg.train.report_to, out, cfg.to_dict(),
                                                history.data.setdefault("trackers", {}), steps_trained), main_only=True)
    return opened if ctx.is_main else Trackers()


def _resumed_commits(checkpoint: Optional[str]) -> dict:
    """The Hub commits the run being resumed started from (history.json `hub_commits` in its checkpoint)."""
    if checkpoint is None:
        return {}
    try:
        with open(os.path.join(checkpoint, HISTORY_FILE), encoding="utf-8") as f:
            return json.load(f).get("hub_commits") or {}
    except (OSError, ValueError):
        return {}


def check_token_ids(tasks: list, rows: int) -> None:
    """Token ids past the embedding table (`rows`) fail deep inside torch, or as a CUDA assert: say it here."""
    for t in tasks:
        for split, docs in (("train", t.train), ("val", t.val)):
            top = max(int(docs.input_ids.max(initial=0)), int(docs.labels.max(initial=0)))
            if top >= rows:
                raise ModelError(f"task '{t.name}' ({split}) has token id {top}, but the model's embedding has only "
                                 f"{rows} rows: the tokenizer does not match the model (resize the embeddings)")


def prepare_output_dir(out: str, overwrite: bool, cfg: Optional[Config] = None) -> Optional[str]:
    """Check `out` without changing what it holds; returns the checkpoint to resume from, or None
    to start fresh (then `clear_run` removes the old run's files once the inputs are validated).

    A finished run is kept unless `overwrite`; an unfinished one resumes from its newest complete
    checkpoint when it has one (and the same config), and otherwise starts over.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"output_dir {out} is a file, not a folder")
    history_path = os.path.join(out, HISTORY_FILE)
    if not overwrite and os.path.exists(history_path):
        try:
            with open(history_path, encoding="utf-8") as f:
                status = json.load(f).get("status")
        except (OSError, ValueError):
            status = "unreadable"
        if status == "finished":
            raise OutputError(f"output_dir {out} already holds a finished run; pass --overwrite to start over")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OutputError(f"output_dir {out} is not writable ({e.strerror})") from None
    checkpoint = None if overwrite else latest_checkpoint(out)
    if checkpoint is not None and cfg is not None:
        _check_same_config(out, cfg)
    return checkpoint


def clear_run(out: str) -> None:
    """Remove a previous run's files (only our own: output_dir may hold anything else)."""
    if os.path.exists(os.path.join(out, "config.yaml")):
        log.info("output_dir %s: removing the previous run's files to start over", out)
    for name in RUN_ARTIFACTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)


def _check_same_config(out: str, cfg: Config) -> None:
    """Resuming with other settings would not continue the same run: name the first difference."""
    try:
        with open(os.path.join(out, "config.yaml"), encoding="utf-8") as f:
            before = _flatten(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError):
        raise OutputError(f"output_dir {out} holds an unfinished run whose config.yaml cannot be read; "
                          "pass --overwrite to start over") from None
    now = _flatten(cfg.to_dict())
    for key in sorted(set(before) | set(now)):
        if key not in RESUMABLE_CHANGES and before.get(key) != now.get(key):
            raise OutputError(f"output_dir {out} holds an unfinished run with another value of '{key}' "
                              f"({before.get(key)!r} there, {now.get(key)!r} now); rerun with the same config "
                              "to resume it, or pass --overwrite to start over")


def _check_same_data(out: str, checkpoint: str, digests: dict) -> None:
    """The documents tokenized now must be those the run trained on: a data file edited in place,
    another tokenizer or chat template leaves config.yaml the same but changes what the resumed steps
    would train on."""
    try:
        with open(os.path.join(checkpoint, HISTORY_FILE), encoding="utf-8") as f:
            before = json.load(f).get("data_digests")
    except (OSError, ValueError):
        return  # an unreadable checkpoint is named when it is loaded
    if not before:  # a checkpoint from a release that did not record them
        return
    for task, splits in digests.items():
        for split, digest in splits.items():
            if before.get(task, {}).get(split) != digest:
                raise OutputError(
                    f"output_dir {out} holds an unfinished run whose {split} documents of task '{task}' differ "
                    "from those tokenized now (its data, the tokenizer or the chat template changed); restore "
                    "them to resume it, or pass --overwrite to start over")


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat
