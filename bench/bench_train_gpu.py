"""Trainer throughput through the real `msft-fast train`: tokens/s, MFU and peak memory of a Llama-style
model on packed rows, one process per variant (attention backend x torch.compile x activation
checkpointing); and a 2-task mSFT roll-out with one roll-back on the same model (--rollout).

Builds a model folder from a transformers LlamaConfig (default: the Llama-3.2-1B shape, 1.24B
parameters, random weights) with the built-in character tokenizer, writes two synthetic text tasks
whose documents (256 to `--seq` tokens) pack into rows of `--seq` tokens, trains `--steps` optimizer
steps with plain SFT and reads `metrics.jsonl` (per step: tokens, MFU against the device's peak,
peak memory, time split into data / forward+backward / optimizer) and `history.json` (totals). The
first `--skip` steps (allocation, autotuning, compilation) are left out of the figures. Each variant
also reports the memory preflight's estimate for its settings (msft_fast/runtime/preflight.py, computed
here from the same config) beside the peak it took: on CUDA torch.cuda.max_memory_allocated, on a
CPU the process's max RSS (not comparable: the estimate is of GPU memory). Variants that need
something this machine lacks print one "not available" line. The JSON and table are rewritten after
every variant, so a run cut short keeps what it measured.

--rollout: method msft on both tasks, evaluated 4 times per epoch, with a metric that makes the
first task peak at the second evaluation (bench/rollback_metric.py): one exclusion and one real
roll-back. Reported: snapshot captures (host time, and the extra time of the training steps they
overlap, on the steps right after an evaluation), restores, both as a share of training time.

    python bench/bench_train_gpu.py [--steps 30 --seq 8192] [--attn flex_attention flash_attention_2]
                                    [--compile off on] [--ac off selective]
    python bench/bench_train_gpu.py --variants flex_attention:off:off flex_attention:on:selective  # attn:compile:ac
    python bench/bench_train_gpu.py --rollout              # the mSFT roll-out instead of variants
    python bench/bench_train_gpu.py --cpu                  # tiny shapes on the CPU: checks that it runs
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_msft import REPO, machine_info, write_outputs  # noqa: E402

# Dense bf16 peak of the chips we expect (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def build_model_folder(folder: str, a) -> dict:
    """A HF model folder: config, random weights (bf16 safetensors), the built-in char tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from msft_fast.builtin import char_tokenizer

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(a.seq, 2048), rope_theta=500000.0, tie_word_embeddings=a.tied,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
    stamp = os.path.join(folder, "bench_shape.json")
    shape = cfg.to_dict()
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == json.loads(json.dumps(shape)):
                return shape
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1B weights is slow on a CPU
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    del model
    with open(stamp, "w") as f:
        json.dump(shape, f)
    return shape


def write_tasks(root: str, a) -> list[dict]:
    """Two text tasks of log-uniform document lengths in [256, seq] characters (one token each),
    a little more than `steps` packed rows in all."""
    return write_text_tasks(root, a.steps * a.seq // 2 * 11 // 10 + a.seq, a.seq, min_len=256, max_len=a.seq - 2)


def write_text_tasks(root: str, train_tokens: int, val_tokens: int, min_len: int, max_len: int) -> list[dict]:
    """Tasks `alpha` and `beta`, each about `train_tokens` characters (one token each with the char
    tokenizer, plus BOS and EOS) of documents whose lengths are log-uniform in [min_len, max_len]."""
    import numpy as np

    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz ,.0123456789"))
    for name in ("alpha", "beta"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for split, tokens in (("train", train_tokens), ("val", val_tokens)):
            path = os.path.join(root, name, f"{split}.jsonl")
            with open(path, "w") as f:
                while tokens > 0:
                    n = int(np.exp(rng.uniform(np.log(min_len), np.log(max_len))))
                    f.write(json.dumps({"text": "".join(rng.choice(alphabet, n))}) + "\n")
                    tokens -= n
    return [{"name": n, "train": os.path.join(root, n, "train.jsonl"), "val": os.path.join(root, n, "val.jsonl")}
            for n in ("alpha", "beta")]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model and row shape (default: Llama-3.2-1B, rows of 8192 packed tokens, bf16); --cpu: tiny."""
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (a dry run of the GPU bench)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seq", type=int, default=8192, help="packed row length = tokens per micro-batch")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--workdir", default="/tmp/bench_work/train_gpu")


def cpu_shapes(a) -> None:
    """--cpu: the same code on a tiny Llama, rows of 512 tokens, fp32."""
    if a.cpu:
        a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.vocab = 64, 128, 2, 4, 2, 512
        a.seq, a.precision = 512, "fp32"


def model_dir_for(a) -> str:
    return os.path.join(a.workdir, f"llama_{a.layers}x{a.hidden}_v{a.vocab}")


def attention_for(requested: str, cpu: bool, precision: str) -> str:
    """The HF attn_implementation `msft-fast train` resolves `model.attn_implementation` to."""
    import torch

    from msft_fast.model import choose_attention, compute_dtype_for

    device = torch.device("cpu" if cpu else "cuda")
    return choose_attention(requested, device, compute_dtype_for(precision, device))


def preflight_for(config_path: str, model_dir: str, attention: str, device: str) -> dict:
    """The memory preflight's estimate for a run config (as `msft-fast train` makes it, one rank)."""
    from transformers import AutoConfig

    from msft_fast.config import load_config
    from msft_fast.model import compute_dtype_for
    from msft_fast.runtime.preflight import GIB, estimate_run

    import torch

    cfg = load_config(config_path)
    est = estimate_run(cfg, AutoConfig.from_pretrained(model_dir), 1,
                       compute_dtype_for(cfg.train.precision, torch.device(device)), device, attention=attention)
    parts = ("weights", "grads", "optimizer", "gathered", "activations", "loss", "workspace")
    return {"preflight_gib": est.total / GIB, "preflight_parts_gib": {k: getattr(est, k) / GIB for k in parts}}


def memory_vs_preflight(preflight: dict, peak_gib, device: str) -> dict:
    """The estimate beside the peak a run took. Goal (CUDA): the estimate is at least 90% of the peak."""
    out = dict(preflight, peak_gib=peak_gib, peak_kind="CUDA max allocated" if device == "cuda" else "max RSS")
    if peak_gib:
        out["estimate_over_peak"] = preflight["preflight_gib"] / peak_gib
        out["underestimate_within_10pct"] = out["estimate_over_peak"] >= 0.9 if device == "cuda" else None
    return out


def variant_name(attn: str, compile_: bool, ac: str) -> str:
    return f"{attn}_compile_{'on' if compile_ else 'off'}" + ("" if ac == "off" else f"_ac_{ac}")


def unavailable(attn: str, cpu: bool) -> str | None:
    """Why `attn` cannot train here (None: it can)."""
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (carry its wheel: bench/gather_wheels.sh)"
    if attn == "flash_attention_2" and cpu:
        return "flash-attn needs CUDA"
    if attn == "flex_attention" and cpu:
        return "FlexAttention training needs CUDA (no backward on a CPU)"
    return None  # "auto" always trains: the trainer picks what can


def run_config(a, model_dir: str, tasks: list[dict], name: str, attn: str, **train) -> dict:
    out = os.path.join(a.workdir, "runs", name)
    return {"method": "sft", "output_dir": out, "model": {"path": model_dir, "attn_implementation": attn},
            "data": {"tasks": tasks, "max_seq_len": a.seq, "tokens_per_batch": a.seq,
                     "cache_dir": os.path.join(a.workdir, "cache")},
            "train": {"lr": 1e-5, "epochs": 1, "seed": 0, "warmup_steps": 0, "schedule": "constant",
                      "precision": a.precision, "progress": False, "log_every": 1,
                      "checkpoint_every": 0, **train},  # no resumable checkpoint: not what is measured
            "msft": {"evals_per_epoch": 1}}


def train_subprocess(a, config: dict, name: str, extra_pythonpath: str = "") -> tuple[subprocess.CompletedProcess,
                                                                                         float, str]:
    import yaml

    path = os.path.join(a.workdir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    env = dict(os.environ)
    if extra_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_pythonpath, env.get("PYTHONPATH", "")) if p)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "msft_fast.cli", "train", "--config", path, "--overwrite"],
                          capture_output=True, text=True, timeout=a.timeout, cwd=a.workdir, env=env)
    return proc, time.time() - t0, path


def finished_run(out: str) -> tuple[list[dict], dict]:
    """A finished run's metrics.jsonl records and history.json; its final/ is removed (2.5 GB for the
    1B model: a check's runs would fill the disk)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    shutil.rmtree(os.path.join(out, "final"), ignore_errors=True)
    return steps, history


def failure(name: str, proc, wall: float) -> dict:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"variant": name, "status": "failed", "why": " | ".join(tail)[-400:], "wall_seconds": wall}


def run_variant(a, model_dir: str, tasks: list[dict], attn: str, compile_: bool, workdir: str,
                ac: str = "off") -> dict:
    name = variant_name(attn, compile_, ac)
    why = unavailable(attn, a.cpu)
    if why:
        return {"variant": name, "status": "not available", "why": why}
    train = {**({"compile": True} if compile_ else {}), **({"activation_checkpointing": ac} if ac != "off" else {})}
    config = run_config(a, model_dir, tasks, name, attn, **train)
    proc, wall, path = train_subprocess(a, config, name)
    if proc.returncode != 0:
        return failure(name, proc, wall)
    steps, history = finished_run(config["output_dir"])
    device = "cpu" if a.cpu else "cuda"
    figures = step_figures(steps, a.skip, a.gpu_name)
    memory = memory_vs_preflight(preflight_for(path, model_dir, attention_for(attn, a.cpu, a.precision), device),
                                 figures["peak_mem_gib"], device)
    return {"variant": name, "status": "ok", "attn": attn, "attn_used": history.get("attn_implementation"),
            "compile": compile_, "activation_checkpointing": ac, **figures, "memory": memory,
            "padding_fraction": history.get("padding_fraction"), "static_tokens": history.get("static_tokens"),
            "eval_seconds": history["totals"]["eval_seconds"], "totals_mfu": history["totals"].get("mfu"),
            "totals_tokens_per_s": history["totals"].get("tokens_per_s"), "wall_seconds": wall}


def step_figures(steps: list[dict], skip: int, gpu_name: str = "") -> dict:
    """tokens/s, MFU, peak memory and the time split over metrics.jsonl records after the first `skip`."""
    timed = steps[skip:] or steps[-1:]
    flops = [s["train_flops"] - (steps[i - 1]["train_flops"] if i else 0) for i, s in enumerate(steps)][-len(timed):]
    seconds = sum(s["step_seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    achieved = sum(flops) / seconds
    if all("mfu" in s for s in timed):  # the trainer's own peak table (or train.peak_tflops)
        mfu = sum(s["mfu"] * s["step_seconds"] for s in timed) / seconds
        peak = achieved / mfu if mfu else None
    else:
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None) if gpu_name else None
        mfu = achieved / peak if peak else None
    parts = {k: sum(s.get("time", {}).get(k, 0.0) for s in timed) / seconds for k in ("data", "fwd_bwd", "optimizer")}
    host = sum(s.get("host_seconds", s["step_seconds"]) for s in timed)
    return {"steps": len(steps), "timed_steps": len(timed), "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_device": sum(s.get("tokens_per_s_per_device", 0) * s["step_seconds"] for s in timed)
            / seconds or None, "train_flops_per_s": achieved, "mfu": mfu, "peak_flops": peak,
            "step_seconds_median": sorted(s["step_seconds"] for s in timed)[len(timed) // 2],
            "host_over_device_seconds": host / seconds,
            "peak_mem_gib": max((s.get("peak_mem_gib", 0.0) for s in steps), default=None),
            "time_share": parts}


def run_rollout(a, model_dir: str, tasks: list[dict]) -> dict:
    """A 2-task mSFT roll-out with one roll-back: snapshot and restore cost as a share of training."""
    name = "msft_rollout"
    attn = a.attn[0]
    if unavailable(attn, a.cpu):
        attn = "auto"  # the trainer's own choice
    config = run_config(a, model_dir, tasks, name, attn, epochs=2)
    config["method"] = "msft"
    # States that do not fit in host memory (by MemAvailable, or $MSFT_FAST_HOST_MEMORY_GIB) spill to
    # disk instead of stopping the run; spills are reported and counted in the cost.
    config["msft"] = {"budget_epochs": 1, "evals_per_epoch": 4, "max_stages": 2,
                      "metric": "rollback_metric:first_task_peaks_early",
                      "snapshot_spill_dir": os.path.join(a.workdir, "spill")}
    proc, wall, path = train_subprocess(a, config, name, extra_pythonpath=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode != 0:
        return failure(name, proc, wall)
    steps, h = finished_run(config["output_dir"])
    t = h["totals"]
    # Captures follow evaluations and overlap the next step: compare those steps with the others
    # (the first `skip` steps, warm-up, left out of both).
    after_eval = {e["steps_trained"] for e in h["evals"]}  # index of the step that follows each evaluation
    timed = [(i, s["step_seconds"]) for i, s in enumerate(steps) if i >= a.skip]
    overlapped = [dt for i, dt in timed if i in after_eval]
    plain = [dt for i, dt in timed if i not in after_eval]
    base = statistics.median(plain) if plain else None
    overlap_cost = sum(max(0.0, dt - base) for dt in overlapped) if base else 0.0
    train_s = t["train_seconds"]
    pool = h.get("snapshot_pool") or {}
    device = "cpu" if a.cpu else "cuda"
    return {
        "variant": name, "status": "ok", "attn": attn, "wall_seconds": wall, "steps": len(steps),
        "stages": [{k: st[k] for k in ("stage", "excluded", "rollback_to_eval", "steps_kept", "steps_discarded")}
                   for st in h["stages"]],
        "rollbacks": sum(1 for st in h["stages"] if st["rollback_to_eval"] is not None),
        "evaluations": len(h["evals"]), "train_seconds": train_s, "eval_seconds": t["eval_seconds"],
        "snapshot_seconds": t["snapshot_seconds"], "restore_seconds": t["restore_seconds"],
        "snapshot_bytes_per_state": pool.get("bytes_per_state"), "snapshot_states_planned": pool.get("states"),
        "steps_after_evaluations": len(overlapped), "median_step_seconds": base,
        "capture_overlap_seconds": overlap_cost,
        "snapshot_spills": t.get("snapshot_spills", 0), "spill_seconds": t.get("spill_seconds", 0.0),
        "share_of_training": {
            "snapshot_host": t["snapshot_seconds"] / train_s, "capture_overlap": overlap_cost / train_s,
            "restore": t["restore_seconds"] / train_s,
            "total": (t["snapshot_seconds"] + overlap_cost + t["restore_seconds"]) / train_s},
        "peak_mem_gib": t.get("peak_mem_gib"),
        "memory": memory_vs_preflight(preflight_for(path, model_dir, attention_for(attn, a.cpu, a.precision),
                                                    device), max(s.get("peak_mem_gib", 0.0) for s in steps), device),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of tokens/s and MFU")
    p.add_argument("--attn", nargs="+", default=["flex_attention", "flash_attention_2"])
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--ac", nargs="+", default=["off", "selective"], choices=["off", "full", "selective"],
                   help="train.activation_checkpointing values (a third axis of variants)")
    p.add_argument("--activation-checkpointing", action="store_true", help="same as --ac full")
    p.add_argument("--variants", nargs="+", metavar="ATTN:COMPILE:AC",
                   help="an explicit list instead of the --attn x --compile x --ac grid, e.g. sdpa:on:full")
    p.add_argument("--rollout", action="store_true", help="the 2-task mSFT roll-out (one roll-back) instead")
    p.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    p.add_argument("--budget", type=int, default=0, help="seconds for all variants; 0: no limit. Variants that "
                   "cannot start with --timeout seconds left are recorded as skipped")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--stem", help="output file names (default step_train_<device>, msft_rollout_<device>)")
    a = p.parse_args(argv)
    if a.cpu:
        cpu_shapes(a)
        a.steps, a.skip = min(a.steps, 6), min(a.skip, 2)
    import torch

    a.gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.cpu else ""
    os.makedirs(a.workdir, exist_ok=True)
    model_dir = model_dir_for(a)
    t0 = time.time()
    shape = build_model_folder(model_dir, a)
    build_seconds = time.time() - t0
    tasks = write_tasks(os.path.join(a.workdir, f"data_{a.seq}"), a)
    params = None
    try:
        from transformers import AutoConfig, LlamaForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(model_dir)).parameters())
    except Exception:  # noqa: BLE001 - a count for the report only
        pass
    if a.rollout:
        try:
            r = run_rollout(a, model_dir, tasks)
        except subprocess.TimeoutExpired:
            r = {"variant": "msft_rollout", "status": "timed out", "why": f"after {a.timeout}s"}
        return write_rollout_report(a, r, shape, params)
    if a.activation_checkpointing:
        a.ac = ["full"]
    if a.variants:
        plan = []
        for v in a.variants:
            attn, c, ac = (v.split(":") + ["off", "off"])[:3]
            if c not in ("off", "on") or ac not in ("off", "full", "selective"):
                p.error(f"--variants {v}: expected ATTN:off|on:off|full|selective")
            plan.append((attn, c == "on", ac))
    else:
        plan = [(attn, c == "on", ac) for attn in a.attn for c in a.compile for ac in a.ac]
    results = []
    eager_wall = None  # the first eager variant's wall time: a compiled one takes about twice as long
    for attn, compile_, ac in plan:
        left = a.budget - (time.time() - t0) if a.budget else None
        need = 60 if eager_wall is None else min(a.timeout, eager_wall * (2 if compile_ else 1))
        if left is not None and left < need:
            r = {"variant": variant_name(attn, compile_, ac), "status": "skipped",
                 "why": f"out of time ({left:.0f}s of {a.budget}s left, about {need:.0f}s needed)"}
        else:
            if left is not None:
                a.timeout = min(a.timeout, int(left))
            try:
                r = run_variant(a, model_dir, tasks, attn, compile_, a.workdir, ac)
            except subprocess.TimeoutExpired:
                r = {"variant": variant_name(attn, compile_, ac), "status": "timed out", "why": f"after {a.timeout}s"}
        results.append(r)
        if r["status"] == "ok" and not compile_ and eager_wall is None:
            eager_wall = r["wall_seconds"]
        print(f"{r['variant']:>40}: {figure_line(r)}", flush=True)
        write_report(a, results, shape, params, build_seconds, quiet=True)
    return write_report(a, results, shape, params, build_seconds)


def figure_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r['why']}"
    mem = r.get("memory") or {}
    return (f"{r['tokens_per_s']:.0f} tokens/s" + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "")
            + (f", peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") else "")
            + (f", preflight/peak {mem['estimate_over_peak']:.2f}" if mem.get("estimate_over_peak") else ""))


def write_report(a, results: list[dict], shape: dict, params, build_seconds: float, quiet: bool = False) -> dict:
    device = "cuda" if a.gpu_name else "cpu"
    report = {
        "what": "msft-fast train (sft, FSDP2 at one rank), packed rows of --seq tokens: tokens/s and MFU after "
                "the first --skip steps; the memory preflight's estimate beside the peak",
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
        "setup": {k: v for k, v in vars(a).items() if k not in ("gpu_name",)} | {"params": params,
                                                                                 "model_build_seconds": build_seconds},
        "model_shape": model_shape(shape),
        "results": results,
    }
    lines = [f"# Trainer throughput ({device}{', ' + a.gpu_name if a.gpu_name else ''})", "",
             f"{report['date']}, torch {report['machine']['torch']}; Llama {a.layers}x{a.hidden} "
             f"({(params or 0) / 1e9:.2f}B params), vocab {a.vocab}, rows of {a.seq} packed tokens, "
             f"{a.precision}, {a.steps} steps (first {a.skip} not timed)", "",
             "| variant | status | tokens/s | MFU | peak GiB | preflight GiB (/ peak) | median step s | "
             "data / fwd+bwd / optimizer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] == "ok":
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            share = " / ".join(f"{100 * r['time_share'][k]:.0f}%" for k in ("data", "fwd_bwd", "optimizer"))
            peak = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
            mem = r.get("memory") or {}
            pre = (f"{mem['preflight_gib']:.2f} ({mem['estimate_over_peak']:.2f})" if mem.get("estimate_over_peak")
                   else "-")
            lines.append(f"| {r['variant']} | ok | {r['tokens_per_s']:.0f} | {mfu} | {peak} | {pre} | "
                         f"{r['step_seconds_median']:.3f} | {share} |")
        else:
            lines.append(f"| {r['variant']} | {r['status']}: {r['why']} | | | | | | |")
    if device == "cpu":
        lines += ["", "CPU: peak is the process's max RSS, which the GPU-memory estimate does not model."]
    _write(a.out, a.stem or f"step_train_{device}", report, lines, quiet)
    return report


def write_rollout_report(a, r: dict, shape: dict, params) -> dict:
    device = "cuda" if a.gpu_name else "cpu"
    report = {"what": "2-task mSFT roll-out with one roll-back: snapshot captures and restores as a share of "
                      "training time", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
              "setup": {k: v for k, v in vars(a).items() if k not in ("gpu_name",)} | {"params": params},
              "model_shape": model_shape(shape), "rollout": r}
    lines = [f"# mSFT roll-out ({device}{', ' + a.gpu_name if a.gpu_name else ''})", ""]
    if r["status"] == "ok":
        sh = r["share_of_training"]
        lines += [f"Llama {a.layers}x{a.hidden} ({(params or 0) / 1e9:.2f}B), rows of {a.seq} tokens; {r['steps']} "
                  f"steps, {r['evaluations']} evaluations, {r['rollbacks']} roll-back(s); snapshot state "
                  f"{(r['snapshot_bytes_per_state'] or 0) / 1e9:.2f} GB per rank", "",
                  "| part | seconds | share of training time |", "|---|---|---|",
                  f"| training steps | {r['train_seconds']:.2f} | 100% |",
                  f"| snapshot captures (host) | {r['snapshot_seconds']:.3f} | {100 * sh['snapshot_host']:.2f}% |",
                  f"| captures overlapping the next step (extra step time) | {r['capture_overlap_seconds']:.3f} | "
                  f"{100 * sh['capture_overlap']:.2f}% |",
                  f"| restores | {r['restore_seconds']:.3f} | {100 * sh['restore']:.2f}% |",
                  f"| **snapshots + restores** | | **{100 * sh['total']:.2f}%** |", "",
                  "The share depends on how many training steps fall between evaluations (here every quarter "
                  "epoch of a short run); the per-capture cost does not."]
    else:
        lines.append(f"{r['status']}: {r['why']}")
    _write(a.out, a.stem or f"msft_rollout_{device}", report, lines, quiet=False)
    return report


def model_shape(shape: dict) -> dict:
    return {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "vocab_size", "tie_word_embeddings")}


def _write(out: str, stem: str, report: dict, lines: list[str], quiet: bool) -> None:
    if quiet:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            write_outputs(out, stem, report, lines)
    else:
        write_outputs(out, stem, report, lines)


if __name__ == "__main__":
    main()
