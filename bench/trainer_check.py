"""The trainer's CUDA paths checked on one GPU, in one process (part `trainer_check` of bench/gpu_check.sh);
with --cpu the same code on a tiny model.

Runs the real `msft_fast.run.train` (Llama-3.2-1B shape, random init, rows of 8192 packed tokens,
bf16, train.grad_accum=2) with a method that drives the trainer through five checks (in the order
snapshot, host syncs, reductions and time split, memory):

1. gradient reductions: every FSDP unit reduces its gradients once per optimizer step, not once
   per micro-batch (msft_fast.training.step_audit.GradientReductions);
2. host-device syncs per step and where each comes from (HostSyncAudit: CUDA's sync debug mode on a
   GPU); the trainer's own must be one, its reduction read back;
3. the step's time split from device marks (metrics.jsonl) against wall time;
4. snapshots (SnapshotPool with the CUDA copy engine): host buffers pinned; a capture overlapping the
   next step, its cost in step time; weights and Adam state restored bitwise; capture and restore s/GB;
5. memory: the preflight's estimate (msft_fast/runtime/preflight.py) against torch.cuda.max_memory_allocated
   over the training steps (goal: it does not underestimate by more than 10%).

Writes one JSON (--out), rewritten after every check, and exits 1 when a check failed; the JSON says which. The figures of a CPU
run mean nothing: it checks that the code runs, and the counts.

    python bench/trainer_check.py --out /tmp/trainer_check.json          # one GPU, about 1-2 minutes
    python bench/trainer_check.py --cpu --out /tmp/trainer_check.json    # here, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_msft import machine_info  # noqa: E402
from bench_train_gpu import (  # noqa: E402
    add_model_args, build_model_folder, cpu_shapes, memory_vs_preflight, model_dir_for, write_text_tasks,
)


class ChecksDone(Exception):
    """Raised by the method once the checks ran: the run stops there (no export of the model)."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--attn", default="auto", help="model.attn_implementation (auto: flash-attn if installed, "
                   "else FlexAttention on a GPU; SDPA on a CPU)")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="steps before anything is measured")
    p.add_argument("--audit-steps", type=int, default=2, help="steps under the host-sync audit")
    p.add_argument("--steps", type=int, default=4, help="timed steps (time split, reductions, memory)")
    p.add_argument("--pairs", type=int, default=2, help="plain step / capture + step pairs")
    p.add_argument("--out", required=True, help="the JSON to write")
    a = p.parse_args(argv)
    cpu_shapes(a)
    from msft_fast import run
    from msft_fast.config import load_config

    os.makedirs(a.workdir, exist_ok=True)
    model_dir = model_dir_for(a)
    build_model_folder(model_dir, a)
    steps_needed = a.warmup + a.audit_steps + a.steps + 2 * a.pairs + 4
    tasks = write_text_tasks(os.path.join(a.workdir, f"check_data_{a.seq}"),
                             steps_needed * a.grad_accum * a.seq * 6 // 10 + a.seq, a.seq, 256 if a.seq > 1024 else 32,
                             a.seq - 2)
    result = {"what": __doc__.split("\n")[0], "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
              "setup": vars(a), "checks": {}, "failed": []}
    task_list = ", ".join(f"{{name: {t['name']}, train: {t['train']}, val: {t['val']}}}" for t in tasks)
    cfg = load_config(None, [
        f"output_dir={os.path.join(a.workdir, 'runs', 'trainer_check')}", f"model.path={model_dir}",
        f"model.attn_implementation={a.attn}", f"data.tasks=[{task_list}]", f"data.max_seq_len={a.seq}",
        f"data.tokens_per_batch={a.seq}", f"data.cache_dir={os.path.join(a.workdir, 'cache')}",
        f"train.precision={a.precision}", f"train.grad_accum={a.grad_accum}", "train.epochs=1",
        "train.lr=1e-5", "train.schedule=constant", "train.progress=false", "train.checkpoint_every=0",
        "train.fsdp=always"])  # a GPU always shards; the CPU rehearsal (fp32, one process) must too
    original = run.METHODS["sft"]
    run.METHODS["sft"] = lambda trainer, history, metric: checks(trainer, a, result)
    try:
        run.train(cfg, overwrite=True)
    except ChecksDone:
        pass
    except Exception as e:  # noqa: BLE001 - the JSON says what broke, with what was measured before
        fail(result, "run", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        traceback.print_exc()
    finally:
        run.METHODS["sft"] = original
        save(result, a.out)
    for name, c in result["checks"].items():
        print(f"{name:>22}: {c.get('summary', '')}")
    print("failed: " + (", ".join(result["failed"]) or "none"))
    return 1 if result["failed"] else 0


def checks(trainer, a, result: dict) -> dict:
    """The checks, the snapshot's first (what a GPU run is most wanted for); the JSON is rewritten
    after each, so a run killed at its time limit keeps the checks that finished."""
    import torch

    device = trainer.ctx.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(a.warmup):  # the memory peak counts these too: the preflight must cover the whole run
        step(trainer)
    result["checks"]["snapshot"] = check_snapshots(trainer, a.pairs, sync, result)
    save(result, a.out)
    result["checks"]["host_syncs"] = check_host_syncs(trainer, a.audit_steps, result)
    save(result, a.out)
    reductions, timing = check_reductions_and_timing(trainer, a.steps, sync, result)
    result["checks"]["grad_reductions"], result["checks"]["time_split"] = reductions, timing
    save(result, a.out)
    result["checks"]["memory"] = check_memory(trainer, a, result)
    raise ChecksDone  # the run stops here: no export of the model


def save(result: dict, path: str) -> None:
    """The JSON, written whole (renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def step(trainer) -> None:
    """One optimizer step; epochs roll over as in train_until."""
    c = trainer.counters
    if c.step_in_epoch >= trainer.loader.steps_in_epoch(c.epoch):
        c.epoch, c.step_in_epoch = c.epoch + 1, 0
    trainer.train_step()


def fail(result: dict, name: str, why: str) -> None:
    result["failed"].append(f"{name}: {why}")


def check_host_syncs(trainer, steps: int, result: dict) -> dict:
    from msft_fast.training.step_audit import HostSyncAudit

    with HostSyncAudit(trainer.ctx.device) as audit:
        for _ in range(steps):
            step(trainer)
    # The loss (kernels/) gets its label count from the batch and must not read the device either.
    ours = [e for e in audit.events if (e.in_files("msft_fast/") and not e.in_files("msft_fast/data/"))
            or e.came_through("/kernels/")]
    read = [e for e in ours if e.stack[-1].endswith(" in read_to_host")]
    by_origin: dict[str, int] = {}
    for e in audit.events:
        origin = ("trainer reduction read" if e in read else "loss kernel (kernels/)" if e.came_through("/kernels/")
                  else "msft_fast (other)" if e in ours else
                  "msft_fast/data (host arrays)" if e.in_files("msft_fast/data/") else "libraries")
        by_origin[origin] = by_origin.get(origin, 0) + 1
    per_step = {k: v / steps for k, v in by_origin.items()}
    if len(read) != steps or len(ours) != len(read):
        fail(result, "host_syncs", f"msft_fast made {len(ours) / steps:g} host reads per step, expected 1 "
             f"(its reduction): {[e.where for e in ours if e not in read][:5]}")
    total = len(audit.events) / steps
    return {"mechanism": "CUDA sync debug mode" if trainer.ctx.device.type == "cuda" else
            "Python-level tensor reads (CPU: nothing synchronises)", "steps": steps,
            "per_step": per_step, "total_per_step": total, "by_site": audit.by_site(),
            "goal_one_per_step": total == 1.0,
            "summary": f"{total:g} per step ({', '.join(f'{k} {v:g}' for k, v in per_step.items())})"}


def check_reductions_and_timing(trainer, steps: int, sync, result: dict) -> tuple[dict, dict]:
    from torch.distributed.fsdp import FSDPModule

    from msft_fast.training.step_audit import GradientReductions

    units = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
    counts, micro = [], []
    sync()
    t0 = time.perf_counter()
    first = trainer.counters.steps_trained
    for _ in range(steps):
        c = trainer.counters
        micro.append(len(trainer.loader.step_plans(c.epoch, c.step_in_epoch)) // trainer.ctx.world_size)
        with GradientReductions() as counted:
            step(trainer)
        counts.append(counted.units)
    sync()
    wall = time.perf_counter() - t0
    trainer.log_finished_steps(wait=True)
    with open(trainer.metrics_path) as f:
        records = [json.loads(line) for line in f][first:first + steps]
    if counts != [units] * steps:
        fail(result, "grad_reductions", f"{counts} unit reductions per step, expected {units} (one per FSDP unit)")
    reductions = {"fsdp_units": units, "micro_batches_per_step": micro, "unit_reductions_per_step": counts,
                  "summary": f"{statistics.mean(counts) / units:g} per FSDP unit per step "
                             f"({statistics.mean(micro):g} micro-batches per step)"}
    device_s = sum(r["step_seconds"] for r in records)
    split = {k: sum(r["time"][k] for r in records) / device_s for k in ("data", "fwd_bwd", "optimizer")}
    timing = {"steps": len(records), "wall_seconds": wall, "device_seconds": device_s,
              "host_seconds": sum(r["host_seconds"] for r in records), "device_over_wall": device_s / wall,
              "split": split, "tokens_per_s": sum(r["tokens"] for r in records) / wall,
              "summary": f"device marks {device_s:.3f} s of {wall:.3f} s wall; data / fwd+bwd / optimizer "
                         + " / ".join(f"{100 * v:.0f}%" for v in split.values())}
    if not 0.5 < timing["device_over_wall"] <= 1.05:
        fail(result, "time_split", f"the device marks cover {timing['device_over_wall']:.2f} of the wall time")
    return reductions, timing


def check_memory(trainer, a, result: dict) -> dict:
    import torch

    from msft_fast.runtime.preflight import GIB, estimate_run
    from msft_fast.training.trainer import peak_memory_gib

    device = trainer.ctx.device
    lm = trainer.model.lm
    est = estimate_run(trainer.cfg, lm.config, trainer.ctx.world_size, trainer.param_dtype, device.type,
                       attention=lm.config._attn_implementation, num_params=sum(p.numel() for p in lm.parameters()))
    parts = ("weights", "grads", "optimizer", "gathered", "activations", "loss", "workspace")
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else peak_memory_gib(device)
    out = memory_vs_preflight({"preflight_gib": est.total / GIB,
                               "preflight_parts_gib": {k: getattr(est, k) / GIB for k in parts}},
                              peak, device.type)
    if out.get("underestimate_within_10pct") is False:
        fail(result, "memory", f"the preflight estimated {out['preflight_gib']:.2f} GiB, the steps took {peak:.2f} GiB")
    out["summary"] = (f"preflight {out['preflight_gib']:.2f} GiB, {out['peak_kind']} {peak:.2f} GiB"
                      + (f" (ratio {out['estimate_over_peak']:.2f})" if device.type == "cuda" else
                         " (not comparable on a CPU)"))
    return out


def local_state(trainer) -> tuple[list, list]:
    """Copies (on the device) of this rank's parameter shards and optimizer state, for bitwise checks."""
    from msft_fast.state.snapshot import optimizer_tensors, sharded_params

    params = [t.detach().clone() for t in sharded_params(trainer.model)]
    optim = [{k: v.detach().clone() for k, v in d.items()} for d in optimizer_tensors(trainer.model, trainer.optimizer)]
    return params, optim


def check_snapshots(trainer, pairs: int, sync, result: dict) -> dict:
    import torch

    pool = trainer.make_pool(capacity=2, with_optimizer=True)
    engine = pool.engine
    # First capture: allocates (on CUDA, pins) the host buffers; later captures reuse them.
    sync()
    t0 = time.perf_counter()
    first = trainer.capture()
    engine.wait()
    first_s = time.perf_counter() - t0
    gb = first.nbytes / 1e9
    pinned = all(t.is_pinned() for t in first.params) and all(t.is_pinned() for d in first.optim for t in d.values())
    pool.release(first)
    # Training time with and without a capture before the step (the copy overlaps the step's
    # forward and backward; the optimizer step waits for it).
    plain, captured, call = [], [], []
    for _ in range(pairs):
        sync()
        t0 = time.perf_counter()
        step(trainer)
        sync()
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        snap = trainer.capture()
        call.append(time.perf_counter() - t0)
        step(trainer)
        sync()
        captured.append(time.perf_counter() - t0)
        pool.release(snap)
    # A capture on its own, to its copies done.
    sync()
    t0 = time.perf_counter()
    snap = trainer.capture()
    engine.wait()
    capture_s = time.perf_counter() - t0
    want = local_state(trainer)  # the state the capture holds (no step in between)
    for _ in range(2):
        step(trainer)
    moved = not all(torch.equal(a, b) for a, b in zip(local_state(trainer)[0], want[0]))
    t0 = time.perf_counter()
    trainer.restore(snap)  # returns once the bytes are back on the device
    restore_s = time.perf_counter() - t0
    got = local_state(trainer)
    bitwise = (all(torch.equal(x, y) for x, y in zip(got[0], want[0]))
               and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(got[1], want[1])))
    has_adam = any("exp_avg" in d for d in want[1])
    cuda = trainer.ctx.device.type == "cuda"
    if not (bitwise and moved and has_adam):
        fail(result, "snapshot", f"restore bitwise={bitwise} (training had moved the state: {moved}; Adam state "
             f"captured: {has_adam})")
    step_s, with_capture = statistics.median(plain), statistics.median(captured)
    overlap = None
    if cuda:  # a CPU copies synchronously: nothing to overlap there
        if not pinned:
            fail(result, "snapshot", "host buffers are not pinned")
        # The capture call only queues the copies (the host goes on at once), and the step it overlaps
        # costs less extra than the copy takes on its own.
        overlap = statistics.median(call) < 0.5 * capture_s and with_capture - step_s < capture_s
        if not overlap:
            fail(result, "snapshot", f"the capture did not overlap the step: call {statistics.median(call):.3f} s, "
                 f"copy {capture_s:.3f} s, step {step_s:.3f} s, with a capture {with_capture:.3f} s")
    return {"gb_per_state": gb, "pinned": pinned, "bitwise_restore": bitwise, "adam_state_included": has_adam,
            "capture_overlaps_step": overlap,
            "first_capture_seconds": first_s, "capture_seconds": capture_s, "capture_seconds_per_gb": capture_s / gb,
            "capture_call_seconds": statistics.median(call), "step_seconds": step_s,
            "step_with_capture_seconds": with_capture, "capture_cost_seconds": with_capture - step_s,
            "capture_cost_in_steps": (with_capture - step_s) / step_s,
            "restore_seconds": restore_s, "restore_seconds_per_gb": restore_s / gb,
            "summary": f"{gb:.2f} GB/state, pinned {pinned}, bitwise {bitwise}; capture {capture_s / gb:.3f} s/GB "
                       f"(costs {with_capture - step_s:+.3f} s on a {step_s:.3f} s step), restore "
                       f"{restore_s / gb:.3f} s/GB"}


if __name__ == "__main__":
    sys.exit(main())
