"""Trainer throughput through the real `msft-fast train`: tokens/s and MFU of a Llama-style model on
packed rows, one process per variant (attention backend x torch.compile x activation checkpointing).

Builds a model folder from a transformers LlamaConfig (default: the Llama-3.2-1B shape, 1.24B
parameters, random weights) with the built-in character tokenizer, writes two synthetic text tasks
whose documents (256 to `--seq` tokens) pack into rows of `--seq` tokens, trains `--steps` optimizer
steps with plain SFT and reads `metrics.jsonl` (per step: tokens, MFU against the device's peak,
peak memory, time split into data / forward+backward / optimizer) and `history.json` (totals). The
first `--skip` steps (allocation, autotuning, compilation) are left out of the figures. Variants that
need something this trainer or machine lacks print one "not available" line and are recorded as
such. The JSON and table are rewritten after every variant, so a run cut short keeps what it measured.

    python bench/bench_train_gpu.py [--steps 30 --seq 8192] [--attn sdpa flex_attention flash_attention_2]
                                    [--compile off on] [--ac off full selective]
    python bench/bench_train_gpu.py --variants sdpa:off:off sdpa:on:off flex_attention:on:full   # attn:compile:ac
    python bench/bench_train_gpu.py --cpu     # tiny shapes on the CPU, about a minute: checks that it runs
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

from bench_msft import REPO, machine_info, write_outputs

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


def trainer_supports(key: str) -> bool:
    """Does this trainer's config have `section.key` (e.g. train.compile)?"""
    from msft_fast import config

    section, name = key.split(".")
    cls = {"train": config.TrainConfig, "model": config.ModelConfig, "data": config.DataConfig}[section]
    return name in cls.__dataclass_fields__


def variant_name(attn: str, compile_: bool, ac: str) -> str:
    return f"{attn}_compile_{'on' if compile_ else 'off'}" + ("" if ac == "off" else f"_ac_{ac}")


def run_variant(a, model_dir: str, tasks: list[dict], attn: str, compile_: bool, workdir: str,
                ac: str = "off") -> dict:
    import yaml

    name = variant_name(attn, compile_, ac)
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return {"variant": name, "status": "not available", "why": "flash-attn is not installed"}
    if attn == "flash_attention_2" and a.cpu:
        return {"variant": name, "status": "not available", "why": "flash-attn needs CUDA"}
    if attn == "flex_attention" and a.cpu:
        return {"variant": name, "status": "not available", "why": "FlexAttention training needs CUDA"}
    if compile_ and not trainer_supports("train.compile"):
        return {"variant": name, "status": "not available", "why": "the trainer has no train.compile config key yet"}
    if ac != "off" and not trainer_supports("train.activation_checkpointing"):
        return {"variant": name, "status": "not available",
                "why": "the trainer has no train.activation_checkpointing config key yet"}
    out = os.path.join(workdir, "runs", name)
    config = {"method": "sft", "output_dir": out, "model": {"path": model_dir, "attn_implementation": attn},
              "data": {"tasks": tasks, "max_seq_len": a.seq, "tokens_per_batch": a.seq,
                       "cache_dir": os.path.join(workdir, "cache")},
              "train": {"lr": 1e-5, "epochs": 1, "seed": 0, "warmup_steps": 0, "schedule": "constant",
                        "precision": a.precision, "progress": False, "log_every": 1},
              "msft": {"evals_per_epoch": 1}}
    if trainer_supports("train.checkpoint_every"):
        config["train"]["checkpoint_every"] = 0  # no resumable checkpoint: not what is measured
    if compile_:
        config["train"]["compile"] = True
    if ac != "off":
        config["train"]["activation_checkpointing"] = ac
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "msft_fast.cli", "train", "--config", path, "--overwrite"],
                          capture_output=True, text=True, timeout=a.timeout, cwd=workdir)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"variant": name, "status": "failed", "why": " | ".join(tail)[-400:], "wall_seconds": wall}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    return {"variant": name, "status": "ok", "attn": attn, "compile": compile_, "activation_checkpointing": ac,
            **step_figures(steps, a.skip, a.gpu_name), "padding_fraction": history.get("padding_fraction"),
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
    return {"steps": len(steps), "timed_steps": len(timed), "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_device": sum(s.get("tokens_per_s_per_device", 0) * s["step_seconds"] for s in timed)
            / seconds or None, "train_flops_per_s": achieved, "mfu": mfu, "peak_flops": peak,
            "step_seconds_median": sorted(s["step_seconds"] for s in timed)[len(timed) // 2],
            "peak_mem_gib": max((s.get("peak_mem_gib", 0.0) for s in steps), default=None),
            "time_share": parts}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (a dry run of the GPU bench)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seq", type=int, default=8192, help="packed row length = tokens per micro-batch")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of tokens/s and MFU")
    p.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"])
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--ac", nargs="+", default=["off"], choices=["off", "full", "selective"],
                   help="train.activation_checkpointing values (a third axis of variants)")
    p.add_argument("--activation-checkpointing", action="store_true", help="same as --ac full")
    p.add_argument("--variants", nargs="+", metavar="ATTN:COMPILE:AC",
                   help="an explicit list instead of the --attn x --compile x --ac grid, e.g. sdpa:on:full")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    p.add_argument("--budget", type=int, default=0, help="seconds for all variants; 0: no limit. Variants that "
                   "cannot start with --timeout seconds left are recorded as skipped")
    p.add_argument("--workdir", default="/tmp/bench_work/train_gpu")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    a = p.parse_args(argv)
    if a.cpu:
        a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.vocab = 64, 128, 2, 4, 2, 512
        a.seq, a.steps, a.skip, a.precision = 512, 6, 2, "fp32"
    import torch

    a.gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.cpu else ""
    os.makedirs(a.workdir, exist_ok=True)
    model_dir = os.path.join(a.workdir, f"llama_{a.layers}x{a.hidden}_v{a.vocab}")
    t0 = time.time()
    shape = build_model_folder(model_dir, a)
    build_seconds = time.time() - t0
    tasks = write_tasks(os.path.join(a.workdir, f"data_{a.seq}"), a)
    from transformers import AutoConfig

    params = None
    try:
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(model_dir)).parameters())
    except Exception:  # noqa: BLE001 - a count for the report only
        pass
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
    for attn, compile_, ac in plan:
        left = a.budget - (time.time() - t0) if a.budget else None
        if left is not None and left < min(a.timeout, 60):
            r = {"variant": variant_name(attn, compile_, ac), "status": "skipped", "why": f"out of time ({a.budget}s)"}
        else:
            if left is not None:
                a.timeout = min(a.timeout, int(left))
            try:
                r = run_variant(a, model_dir, tasks, attn, compile_, a.workdir, ac)
            except subprocess.TimeoutExpired:
                r = {"variant": variant_name(attn, compile_, ac), "status": "timed out", "why": f"after {a.timeout}s"}
        results.append(r)
        figure = (f"{r['tokens_per_s']:.0f} tokens/s" + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "")
                  + (f", peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") else "")
                  if r["status"] == "ok" else f"{r['status']}: {r['why']}")
        print(f"{r['variant']:>40}: {figure}", flush=True)
        write_report(a, results, shape, params, build_seconds, quiet=True)
    return write_report(a, results, shape, params, build_seconds)


def write_report(a, results: list[dict], shape: dict, params, build_seconds: float, quiet: bool = False) -> dict:
    device = "cuda" if a.gpu_name else "cpu"
    report = {
        "what": "msft-fast train (sft, FSDP2 at one rank), packed rows of --seq tokens: tokens/s and MFU after "
                "the first --skip steps",
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
        "setup": {k: v for k, v in vars(a).items() if k not in ("gpu_name",)} | {"params": params,
                                                                                 "model_build_seconds": build_seconds},
        "model_shape": {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size",
                                              "tie_word_embeddings")},
        "results": results,
    }
    lines = [f"# Trainer throughput ({device}{', ' + a.gpu_name if a.gpu_name else ''})", "",
             f"{report['date']}, torch {report['machine']['torch']}; Llama {a.layers}x{a.hidden} "
             f"({(params or 0) / 1e9:.2f}B params), vocab {a.vocab}, rows of {a.seq} packed tokens, "
             f"{a.precision}, {a.steps} steps (first {a.skip} not timed)", "",
             "| variant | status | tokens/s | MFU | peak GiB | median step s | data / fwd+bwd / optimizer |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] == "ok":
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            share = " / ".join(f"{100 * r['time_share'][k]:.0f}%" for k in ("data", "fwd_bwd", "optimizer"))
            peak = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
            lines.append(f"| {r['variant']} | ok | {r['tokens_per_s']:.0f} | {mfu} | {peak} | "
                         f"{r['step_seconds_median']:.3f} | {share} |")
        else:
            lines.append(f"| {r['variant']} | {r['status']}: {r['why']} | | | | | |")
    if quiet:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            write_outputs(a.out, f"step_train_{device}", report, lines)
    else:
        write_outputs(a.out, f"step_train_{device}", report, lines)
    return report


if __name__ == "__main__":
    main()
