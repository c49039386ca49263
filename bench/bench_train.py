"""Training benchmark through the real `msft-fast train` on a random-init Llama-style model folder and two
synthetic text tasks (bench/README.md says how each figure is measured); results are rewritten after every run.

    python bench/bench_train.py [--repeats 3]                            # ours vs HF Trainer (padded, padding-free)
    python bench/bench_train.py --device cuda                            # the same, Llama-3.2-1B shape, rows of 8192
    python bench/bench_train.py --quick                                  # the same at tiny shapes, seconds
    python bench/bench_train.py --variants auto:off:off flex_attention:on:selective [--device cuda]  # tokens/s, MFU
    python bench/bench_train.py --rollout [--device cuda]                # mSFT with one roll-back: snapshot cost
    python bench/bench_train.py --check [--device cuda]                  # the step loop's promises on the device
A variant is ATTN:COMPILE:AC: attention (auto: the trainer's default), torch.compile, activation checkpointing.
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
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, machine_info, table, write_outputs  # noqa: E402

# Model (hidden, intermediate, layers, heads, kv heads, vocab, tied) and rows: seq = longest document =
# data.max_seq_len, tokens per packed micro-batch (ours), HF rows per batch, training tokens per task,
# shortest document, steps left out of the steady figures.
SETTINGS = {
    "cuda": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True,
                 seq=8192, tokens_per_batch=8192, hf_batch_size=1, task_tokens=100_000, min_len=256, skip=3,
                 precision="bf16"),
    "small": dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2, vocab=384, tied=False, seq=40,
                  tokens_per_batch=512, hf_batch_size=32, task_tokens=40_000, min_len=8, skip=4, precision="fp32"),
    "large": dict(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=32000, tied=False, seq=512,
                  tokens_per_batch=2048, hf_batch_size=4, task_tokens=12_000, min_len=32, skip=2, precision="fp32"),
    "quick": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, tied=True, seq=128,
                  tokens_per_batch=512, hf_batch_size=4, task_tokens=1200, min_len=16, skip=1, precision="fp32"),
}
SIDES = {"ours": "msft-fast", "hf": "HF Trainer, padded", "hf_flat": "HF Trainer, padding-free"}
START = time.time()  # --budget counts from here: building the model folder takes its share
_EVALS = [0]


def first_task_peaks_early(model, tokenizer, task_names):
    """An mSFT metric: the first task peaks at the second evaluation, the others keep improving: one roll-back."""
    _EVALS[0] += 1
    return {name: -float((_EVALS[0] - 2) ** 2) if i == 0 else float(_EVALS[0]) for i, name in enumerate(task_names)}


def setting(a, name: str) -> argparse.Namespace:
    """The setting's shape and rows, a value given on the command line in its place; its folders."""
    s = argparse.Namespace(**vars(a), name=name)
    for key, value in SETTINGS[name].items():
        if getattr(a, key, None) is None:
            setattr(s, key, value)
    s.workdir = os.path.join(a.workdir, name)
    s.model_dir = os.path.join(s.workdir, f"llama_{s.layers}x{s.hidden}_v{s.vocab}")
    return s


def build_model_folder(s) -> None:
    """Config, random weights and the char tokenizer, made once per shape (a stamp holds the config)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from msft_fast.builtin import char_tokenizer

    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=max(s.seq, 2048), rope_theta=500000.0, tie_word_embeddings=s.tied,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
    stamp, shape = os.path.join(s.model_dir, "bench_shape.json"), json.loads(json.dumps(cfg.to_dict()))
    if os.path.exists(stamp) and json.load(open(stamp)) == shape:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1B weights is slow on a CPU
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(s.model_dir)
    char_tokenizer().save_pretrained(s.model_dir)
    with open(stamp, "w") as f:
        json.dump(shape, f)


def write_text_tasks(root: str, train_tokens: int, val_tokens: int, min_len: int, max_len: int) -> list[dict]:
    """Tasks alpha and beta of about `train_tokens` characters each (a token each, plus BOS and EOS),
    documents of log-uniform lengths in [min_len, max_len]."""
    import numpy as np

    rng, alphabet = np.random.default_rng(0), np.array(list("abcdefghijklmnopqrstuvwxyz ,.0123456789"))
    for name in ("alpha", "beta"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for split, tokens in (("train", train_tokens), ("val", val_tokens)):
            with open(os.path.join(root, name, f"{split}.jsonl"), "w") as f:
                while tokens > 0:
                    n = int(np.exp(rng.uniform(np.log(min_len), np.log(max_len))))
                    f.write(json.dumps({"text": "".join(rng.choice(alphabet, n))}) + "\n")
                    tokens -= n
    return [{"name": n, "train": os.path.join(root, n, "train.jsonl"), "val": os.path.join(root, n, "val.jsonl")}
            for n in ("alpha", "beta")]


def write_config(s, name: str, tasks: list[dict], attn: str = "auto", method: str = "sft", msft=None, **train) -> str:
    import yaml

    config = {"method": method, "output_dir": os.path.join(s.workdir, "runs", name),
              "model": {"path": s.model_dir, "attn_implementation": attn},
              "data": {"tasks": tasks, "max_seq_len": s.seq, "tokens_per_batch": s.tokens_per_batch,
                       "cache_dir": os.path.join(s.workdir, "cache")},
              "train": {"lr": 1e-4, "epochs": 1, "seed": 0, "warmup_steps": 0, "schedule": "constant",
                        "weight_decay": 0.0, "grad_clip": 1.0, "precision": s.precision, "progress": False,
                        "log_every": 1, "checkpoint_every": 0, **train},  # no checkpoint: not what is measured
              "msft": msft or {"evals_per_epoch": 1}}
    path = os.path.join(s.workdir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def judge_preflight(estimate, peak_gib, device: str) -> dict:
    """The memory preflight's estimate (msft_fast/runtime/preflight.py) beside the peak a run took. Goal (CUDA):
    the estimate is at least 90% of max_memory_allocated (a CPU's max RSS is not what it models)."""
    from msft_fast.runtime.preflight import GIB

    out = {"preflight_gib": estimate.total / GIB, "peak_gib": peak_gib,
           "peak_kind": "CUDA max allocated" if device == "cuda" else "max RSS",
           "preflight_parts_gib": {k: getattr(estimate, k) / GIB for k in (
               "weights", "grads", "optimizer", "gathered", "activations", "loss", "workspace")}}
    if peak_gib:
        out["estimate_over_peak"] = out["preflight_gib"] / peak_gib
        out["underestimate_within_10pct"] = out["estimate_over_peak"] >= 0.9 if device == "cuda" else None
    return out


# ---------------------------------------------------------------------------------------------
# One side of a run, in a process of its own: prints one JSON line


def run_ours(config_path: str, skip: int, device: str) -> dict:
    import torch
    from transformers import AutoConfig

    from msft_fast.cli import main as cli
    from msft_fast.config import load_config
    from msft_fast.runtime.distributed import needs_fsdp
    from msft_fast.model import compute_dtype_for
    from msft_fast.runtime.preflight import estimate_run

    if cli(["train", "--config", config_path, "--overwrite"]) != 0:
        return {"status": "failed", "why": "msft-fast train failed (its log is above)"}
    cfg = load_config(config_path)
    steps = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    h = json.load(open(os.path.join(cfg.output_dir, "history.json")))
    shutil.rmtree(os.path.join(cfg.output_dir, "final"), ignore_errors=True)  # 2.5 GB for the 1B model
    timed, dtype = steps[skip:] or steps[-1:], compute_dtype_for(cfg.train.precision, torch.device(device))
    seconds, peak = sum(s["step_seconds"] for s in timed), max(s.get("peak_mem_gib", 0.0) for s in steps)
    useful = sum(s["tokens"] for s in steps)
    estimate = estimate_run(cfg, AutoConfig.from_pretrained(cfg.model.path), 1, dtype, device,
                            attention=h["attn_implementation"])
    return {"status": "ok", "attn_implementation": h["attn_implementation"], "fsdp2": needs_fsdp(dtype, torch.device(
        device)), "static_tokens": h.get("static_tokens"), "padding_fraction": h.get("padding_fraction"),
        "optimizer_steps": len(steps), "useful_tokens": useful, "final_loss": steps[-1]["loss"],
        "train_tokens_per_s": useful / sum(s["step_seconds"] for s in steps),
        "tokens_per_s": sum(s["tokens"] for s in timed) / seconds, "peak_mem_gib": peak,
        # The trainer's MFU (its peak table, or train.peak_tflops), weighted by step time; None where unknown.
        "mfu": sum(s["mfu"] * s["step_seconds"] for s in timed) / seconds if all("mfu" in s for s in timed) else None,
        "step_seconds_median": statistics.median(s["step_seconds"] for s in timed),
        "time_share": {k: sum(s.get("time", {}).get(k, 0.0) for s in timed) / seconds
                       for k in ("data", "fwd_bwd", "optimizer")}, "memory": judge_preflight(estimate, peak, device)}


def run_hf(config_path: str, skip: int, device: str, batch_size: int, flatten: bool) -> dict:
    """HF Trainer on the documents msft_fast's loader tokenized for the same config: padding-free batches
    (DataCollatorWithFlattening) with `flatten`, else padded ones (DataCollatorForSeq2Seq)."""
    if importlib.util.find_spec("accelerate") is None:
        return {"status": "not available", "why": "HF Trainer needs accelerate: pip install accelerate"}
    import dataclasses
    import resource

    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening,
                              Trainer, TrainerCallback, TrainingArguments)

    from msft_fast.config import load_config
    from msft_fast.data.tasks import load_tasks

    cfg, cuda = load_config(config_path), device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    examples = [{"input_ids": d.input_ids[i:i + n].tolist(), "labels": [-100] + d.labels[i:i + n - 1].tolist()}
                for task in load_tasks(cfg.data, tokenizer) for d in [task.train]  # HF shifts labels itself
                for i, n in zip(d.starts, d.lengths)]
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False  # with a KV cache HF would ignore the documents' restarting position ids
    t, fields = cfg.train, {f.name for f in dataclasses.fields(TrainingArguments)}
    random_order = {"train_sampling_strategy": "random"} if "train_sampling_strategy" in fields else \
        {"group_by_length": False}
    args = TrainingArguments(  # the optimizer is HF's default (adamw_torch_fused); random order, no length groups
        output_dir=os.path.join(os.path.dirname(cfg.output_dir), "hf_trainer"), per_device_train_batch_size=batch_size,
        num_train_epochs=t.epochs, learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0, seed=t.seed,
        weight_decay=t.weight_decay, adam_beta1=t.beta1, adam_beta2=t.beta2, max_grad_norm=t.grad_clip, bf16=cuda,
        use_liger_kernel=liger, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10**9,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=cuda, use_cpu=not cuda,
        **random_order)
    collator = DataCollatorWithFlattening() if flatten else \
        DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    useful, padded, ends = [], [], []

    def collate(features):  # counts the useful and padded tokens of every batch, in order
        batch = collator(features)
        padded.append(batch["input_ids"].numel())
        useful.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else padded[-1])
        return batch

    class StepEnds(TrainerCallback):
        def on_train_begin(self, *_, **__):
            ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    out = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[StepEnds()]).train()
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    n = len(seconds)  # one batch per optimizer step
    return {"status": "ok", "attn_implementation": attn, "liger": liger, "collator": type(collator).__name__,
            "optim": str(getattr(args.optim, "value", args.optim)), "optimizer_steps": n,
            "useful_tokens": sum(useful[:n]), "padded_tokens": sum(padded[:n]), "final_loss": out.training_loss,
            "train_tokens_per_s": sum(useful[:n]) / sum(seconds),
            "tokens_per_s": sum(useful[skip:n]) / sum(seconds[skip:]),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_side(s, side: str, config_path: str, timeout: float) -> dict:
    """One side in a child process of this script (bench/ first on its path: the roll-out's metric imports)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(s.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--config", config_path, "--device", s.device,
           "--skip", str(s.skip), "--hf-batch-size", str(s.hf_batch_size), "--threads", str(s.threads)]
    t0 = time.time()
    try:  # at the time-out the child is killed (SIGKILL): the trainer writes no checkpoint on its way out
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=s.workdir)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "why": f"after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"status"')]
    if not lines:
        return {"status": "failed", "why": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[-400:]}
    return dict(json.loads(lines[-1]), wall_seconds=time.time() - t0, loadavg_1min=os.getloadavg()[0])


# ---------------------------------------------------------------------------------------------
# Ours vs HF Trainer


def round_ratios(runs: dict, peer: str) -> dict:
    """Ours over `peer` within each round (the two ran minutes apart), and their medians over rounds."""
    rounds = [(o, p) for o, p in zip(runs.get("ours", []), runs.get(peer, [])) if o["status"] == p["status"] == "ok"]
    per = [{k: o[f] / p[f] for k, f in (("tokens_per_s", "train_tokens_per_s"), ("steady_tokens_per_s", "tokens_per_s"),
                                        ("peak_memory", "peak_mem_gib"))} for o, p in rounds]
    return {**{k: statistics.median(x[k] for x in per) for k in per[0]}, "tokens_per_s_per_round": [
        x["tokens_per_s"] for x in per], "same_useful_tokens": all(o["useful_tokens"] == p["useful_tokens"]
                                                                    for o, p in rounds)} if rounds else {}


def versus_hf(a, names: list[str]) -> dict:
    sides, stem = a.sides.split(","), f"train_{a.device}" + ("_quick" if a.quick else "")
    report = {"what": "useful (non-padding) tokens/s over all optimizer steps and after the first --skip (steady), "
                      "peak memory of each side's process; the median run per side; ratios ours / HF: the median "
                      "over rounds of the ratio within a round", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": machine_info(), "sides": sides, "repeats": a.repeats, "threads": a.threads, "settings": {}}
    settings, runs = {name: setting(a, name) for name in names}, {name: {} for name in names}
    for s in settings.values():
        build_model_folder(s)
        tasks = write_text_tasks(os.path.join(s.workdir, f"data_{s.seq}_{s.task_tokens}_{s.min_len}"), s.task_tokens,
                                 s.seq, s.min_len, s.seq - 2)
        s.config = write_config(s, "msft_fast", tasks)
    for i in range(a.repeats):  # rounds rotate the side order: a shared machine drifts
        for name, s in settings.items():
            for side in sides[i % len(sides):] + sides[:i % len(sides)]:
                r = run_side(s, side, s.config, a.timeout)
                runs[name].setdefault(side, []).append(r)
                print(f"round {i + 1} {name} {side}: " + (f"{r['train_tokens_per_s']:.0f} useful tokens/s"
                                                           if r["status"] == "ok" else r["why"]), flush=True)
            results = {}
            for side, rs in runs[name].items():  # the median run (the lower middle one) with every run's figure
                ok = sorted((r for r in rs if r["status"] == "ok"), key=lambda r: r["train_tokens_per_s"])
                results[side] = ok[(len(ok) - 1) // 2] | {"per_run": [r["train_tokens_per_s"] for r in ok]} if ok \
                    else rs[-1]
            ratios = {f"over_{peer}": round_ratios(runs[name], side) for peer, side in (("hf_padded", "hf"),
                                                                                      ("hf_flat", "hf_flat"))}
            hf = results.get("hf", {})
            if hf.get("status") == "ok":
                ratios["hf_padding_fraction"] = 1 - hf["useful_tokens"] / hf["padded_tokens"]
            report["settings"][name] = {"setup": {k: getattr(s, k) for k in SETTINGS[name]}, "results": results,
                                        "runs": runs[name], "ratios": ratios}
            write_outputs(a.out, stem, report, vs_hf_markdown(report), quiet=True)
    print("\n".join(vs_hf_markdown(report)))
    return report


def vs_hf_markdown(r: dict) -> list[str]:
    m = r["machine"]
    loads = [x.get("loadavg_1min", 0) for st in r["settings"].values() for rs in st["runs"].values() for x in rs]
    lines = ["# msft-fast train vs HF Trainer (padded and padding-free) on " + (m.get("gpu") or f"CPU ({m['cpu']}), "
             f"{m['cores']} cores, OMP_NUM_THREADS={r['threads']} per side"), "",
             f"{r['date']}, commit {m.get('git_commit', '?')}, torch {m['torch']}, transformers {m['transformers']}; "
             f"{r['repeats']} round(s), the side order rotated per round; 1-minute load average after each run "
             f"{min(loads):.2f}-{max(loads):.2f}."]
    for name, st in r["settings"].items():
        s, rows = st["setup"], []
        for side, label in SIDES.items():
            x = st["results"].get(side)
            rows += [] if not x else [[label, f"{x['status']}: {x['why']}"] + [""] * 7] if x["status"] != "ok" else [[
                label, x["attn_implementation"] + (f", {x['optim']}" if "optim" in x else ""),
                f"{x['train_tokens_per_s']:.0f}", f"{x['tokens_per_s']:.0f}", f"{x['peak_mem_gib']:.3f}",
                x["optimizer_steps"], x["useful_tokens"], f"{x['final_loss']:.3f}",
                ", ".join(f"{y:.0f}" for y in x["per_run"])]]
        lines += ["", f"## {name}: Llama {s['layers']}x{s['hidden']}, vocab {s['vocab']}, {s['precision']}", "",
                  f"2 tasks x {s['task_tokens']} tokens, documents {s['min_len'] + 2}-{s['seq']} tokens (log-uniform); "
                  f"ours: micro-batches of {s['tokens_per_batch']} tokens; HF: {s['hf_batch_size']} rows a batch", ""
                  ] + table(["side", "attention", "useful tokens/s", "steady tokens/s", "peak GiB", "optimizer steps",
                               "useful tokens", "final loss", "tokens/s per run"], rows) + [""]
        for key, peer in (("over_hf_padded", "padded"), ("over_hf_flat", "padding-free")):
            x = st["ratios"][key]
            lines += [f"- ours / HF {peer}: tokens/s **{x['tokens_per_s']:.2f}x** (steady "
                      f"{x['steady_tokens_per_s']:.2f}x), peak memory {x['peak_memory']:.2f}x; per round: "
                      + ", ".join(f"{v:.2f}" for v in x["tokens_per_s_per_round"])] if x else []
        if "hf_padding_fraction" in st["ratios"]:
            lines.append(f"- HF's padded batches were {100 * st['ratios']['hf_padding_fraction']:.1f}% padding")
    return lines


# ---------------------------------------------------------------------------------------------
# Variants and the mSFT roll-out


def unavailable(attn: str, cpu: bool) -> str | None:
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (no wheel small enough to carry: bench/gather_wheels.sh)"
    return "flash-attn needs CUDA" if attn == "flash_attention_2" and cpu else \
        "FlexAttention training needs CUDA (no backward on a CPU)" if attn == "flex_attention" and cpu else None


def step_tasks(a, s) -> list[dict]:  # two tasks of a little more than --steps micro-batches in all
    return write_text_tasks(os.path.join(s.workdir, f"data_{s.seq}_{a.steps}"),
                            a.steps * s.tokens_per_batch * 11 // 20 + s.seq, s.seq, s.min_len, s.seq - 2)


def variants(a, s) -> dict:
    tasks, results, eager = step_tasks(a, s), [], None  # a compiled variant takes about twice an eager one's time
    report = {"what": "msft-fast train (sft, one rank), rows of --seq packed tokens: tokens/s and MFU after the first "
                      "--skip steps; the memory preflight's estimate beside the peak (on a CPU the peak is the max "
                      "RSS, which the estimate of GPU memory does not model)", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": machine_info(), "setup": _setup(s), "results": results}
    for spec in a.variants:
        attn, compile_, ac = (spec.split(":") + ["off", "off"])[:3]
        if compile_ not in ("off", "on") or ac not in ("off", "full", "selective"):
            sys.exit(f"--variants {spec}: expected ATTN:off|on:off|full|selective")
        name = f"{attn}_compile_{compile_}" + ("" if ac == "off" else f"_ac_{ac}")
        left = a.budget - (time.time() - START) if a.budget else a.timeout
        need = 60 if eager is None else min(a.timeout, eager * (2 if compile_ == "on" else 1))
        r = {"status": "not available", "why": unavailable(attn, s.device == "cpu")}
        if r["why"] is None and left < need:
            r = {"status": "skipped", "why": f"out of time ({left:.0f}s of {a.budget}s left, about {need:.0f}s needed)"}
        elif r["why"] is None:
            config = write_config(s, name, tasks, attn, compile=compile_ == "on", activation_checkpointing=ac)
            r = run_side(s, "ours", config, min(a.timeout, left))
            eager = eager or (r.get("wall_seconds") if compile_ == "off" and r["status"] == "ok" else None)
        results.append({"variant": name, "attn": attn, "compile": compile_ == "on", "activation_checkpointing": ac,
                        **r})
        print(f"{name}: {r['status']} {r.get('why', '')}", flush=True)
        write_outputs(a.out, a.stem or f"variants_{s.device}", report, variants_markdown(report), quiet=True)
    print("\n".join(variants_markdown(report)))
    return report


def variants_markdown(r: dict) -> list[str]:
    s = r["setup"]
    return [f"# Trainer throughput ({r['machine'].get('gpu', 'cpu')})", "",
            f"{r['date']}, commit {r['machine'].get('git_commit', '?')}, torch {r['machine']['torch']}; Llama "
            f"{s['layers']}x{s['hidden']}, vocab {s['vocab']}, rows of {s['seq']} tokens, {s['precision']}, "
            f"{s['steps']} steps (first {s['skip']} not timed). {r['what']}.", ""] + table(
        ["variant", "status", "tokens/s", "MFU", "peak GiB", "preflight GiB (/ peak)", "median step s",
         "data / fwd+bwd / optimizer"],
        [[x["variant"], f"{x['status']}: {x['why']}"] + [""] * 6 if x["status"] != "ok" else
         [x["variant"], f"ok ({x['attn_implementation']})", f"{x['tokens_per_s']:.0f}", _pct(x["mfu"]),
          f"{x['peak_mem_gib']:.2f}", f"{x['memory']['preflight_gib']:.2f} "
          f"({x['memory'].get('estimate_over_peak', 0):.2f})",
          f"{x['step_seconds_median']:.3f}", " / ".join(f"{100 * v:.0f}%" for v in x["time_share"].values())]
         for x in r["results"]])


def rollout(a, s) -> dict:
    """mSFT on both tasks, evaluated 4 times per epoch, the first task peaking at the second evaluation:
    one exclusion, one real roll-back. States that do not fit host memory spill to disk (counted)."""
    msft = {"budget_epochs": 1, "evals_per_epoch": 4, "max_stages": 2, "metric": "bench_train:first_task_peaks_early",
            "snapshot_spill_dir": os.path.join(s.workdir, "spill")}
    config = write_config(s, "msft_rollout", step_tasks(a, s), method="msft", msft=msft, epochs=2)
    r = run_side(s, "ours", config, a.timeout)
    if r["status"] == "ok":
        out = os.path.join(s.workdir, "runs", "msft_rollout")
        h = json.load(open(os.path.join(out, "history.json")))
        steps = [json.loads(line)["step_seconds"] for line in open(os.path.join(out, "metrics.jsonl"))]
        t, after_eval = h["totals"], {e["steps_trained"] for e in h["evals"]}
        # A capture follows an evaluation and overlaps the next step: those steps against the others.
        base = statistics.median([dt for i, dt in enumerate(steps) if i >= s.skip and i not in after_eval] or [0.0])
        overlap = sum(max(0.0, dt - base) for i, dt in enumerate(steps) if i >= s.skip and i in after_eval)
        parts = {"snapshot_host": t["snapshot_seconds"], "capture_overlap": overlap, "restore": t["restore_seconds"]}
        r.update(steps=len(steps), evaluations=len(h["evals"]), train_seconds=t["train_seconds"],
                 rollbacks=sum(st["rollback_to_eval"] is not None for st in h["stages"]),
                 snapshot_seconds=t["snapshot_seconds"], restore_seconds=t["restore_seconds"],
                 snapshot_spills=t.get("snapshot_spills", 0),
                 snapshot_bytes_per_state=(h.get("snapshot_pool") or {}).get("bytes_per_state"),
                 share_of_training={k: v / t["train_seconds"] for k, v in
                                    (parts | {"total": sum(parts.values())}).items()})
    report = {"what": "2-task mSFT with one roll-back: snapshot captures and restores as a share of training time",
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "setup": _setup(s), "rollout": r}
    sh = r.get("share_of_training") or {}
    figures = f"{r['status']}: {r['why']}" if not sh else (
        f"{r['steps']} steps, {r['evaluations']} evaluations, {r['rollbacks']} roll-back(s), "
        f"{(r['snapshot_bytes_per_state'] or 0) / 1e9:.2f} GB per state; captures {_pct(sh['snapshot_host'], 2)} "
        f"host + {_pct(sh['capture_overlap'], 2)} overlapping the next step, restores {_pct(sh['restore'], 2)}: "
        f"**{_pct(sh['total'], 2)}** of {r['train_seconds']:.2f} s of training (the share depends on the steps "
        "between evaluations; the cost per capture does not)")
    write_outputs(a.out, a.stem or f"rollout_{s.device}", report, [
        f"# mSFT roll-out ({report['machine'].get('gpu', 'cpu')})", "",
        f"{report['date']}, Llama {s.layers}x{s.hidden}, rows of {s.seq}: {figures}"])
    return report


# ---------------------------------------------------------------------------------------------
# --check: the step loop's promises, in one process: snapshots (pinned host buffers, a capture overlapping the
# next step, weights and Adam state restored bitwise, capture and restore s/GB); host syncs per step and their
# call sites (the trainer's own: one); one gradient reduction per FSDP unit per step and the time split against
# wall time; the memory preflight against max_memory_allocated (within 10%). A CPU only checks the counts.


class ChecksDone(Exception):
    """Raised by the method once the checks ran: the run stops there (no export of the model)."""


def check(a, s) -> dict:
    import torch

    from msft_fast import run
    from msft_fast.config import load_config

    tasks = write_text_tasks(os.path.join(s.workdir, f"check_data_{s.seq}"), 16 * s.tokens_per_batch + s.seq, s.seq,
                             s.min_len, s.seq - 2)  # 32 micro-batches: a little more than the checks take
    cfg = load_config(write_config(s, "trainer_check", tasks, grad_accum=2, lr=1e-5, fsdp="always"))  # as on a GPU
    result = {"what": "the step loop's promises on this device", "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": machine_info(), "setup": _setup(s), "checks": {}, "failed": []}
    stem, original = a.stem or f"trainer_check_{s.device}", run.METHODS["sft"]

    def write(quiet=True):
        write_outputs(a.out, stem, result, [f"# Trainer check ({result['machine'].get('gpu', 'cpu')})", ""] + [
            f"- {name}: {c.get('summary', '')}" for name, c in result["checks"].items()] + [
            "- failed: " + ("; ".join(result["failed"]) or "none")], quiet=quiet)

    def checks(trainer, history, metric):  # the JSON is rewritten after each: a kill keeps what finished
        sync = (lambda: torch.cuda.synchronize(trainer.ctx.device)) if s.device == "cuda" else (lambda: None)
        for _ in range(2):  # warm-up; the memory peak counts these too: the preflight must cover the run
            step(trainer)
        for fn in (check_snapshots, check_host_syncs, check_reductions_and_timing, check_memory):
            for name, found in fn(trainer, 2, sync).items():
                why = found.pop("failed")
                result["checks"][name] = found
                result["failed"] += [f"{name}: {why}"] if why else []
            write()
        raise ChecksDone

    run.METHODS["sft"] = checks
    try:
        run.train(cfg, overwrite=True)
    except ChecksDone:
        pass
    except Exception as e:  # noqa: BLE001 - the JSON says what broke, with what was measured before
        result["failed"].append(f"run: {type(e).__name__}: {(str(e) or ' ').splitlines()[0][:300]}")
        traceback.print_exc()
    finally:
        run.METHODS["sft"] = original
    write(quiet=False)
    if result["failed"]:
        sys.exit(1)
    return result


def step(trainer) -> None:
    """One optimizer step; epochs roll over as in train_until."""
    c = trainer.counters
    if c.step_in_epoch >= trainer.loader.steps_in_epoch(c.epoch):
        c.epoch, c.step_in_epoch = c.epoch + 1, 0
    trainer.train_step()


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def check_snapshots(trainer, steps: int, sync) -> dict:
    import torch

    from msft_fast.state.snapshot import optimizer_tensors, sharded_params

    def state():  # device copies of this rank's parameter shards and optimizer state
        optim = optimizer_tensors(trainer.model, trainer.optimizer)
        return [t.detach().clone() for t in sharded_params(trainer.model)], [
            {k: v.detach().clone() for k, v in d.items()} for d in optim]

    pool = trainer.make_pool(capacity=2, with_optimizer=True)
    snaps = []
    first_s = timed(lambda: (snaps.append(trainer.capture()), pool.engine.wait()), sync)  # allocates (pins) buffers
    first = snaps.pop()
    gb = first.nbytes / 1e9
    pinned = all(t.is_pinned() for t in first.params) and all(t.is_pinned() for d in first.optim for t in d.values())
    pool.release(first)
    plain, captured, calls = [], [], []
    for _ in range(steps):  # a step alone, then a step right after a capture (the copy overlaps it)
        plain.append(timed(lambda: step(trainer), sync))
        t0 = time.perf_counter()
        snaps.append(trainer.capture())
        calls.append(time.perf_counter() - t0)
        step(trainer)
        sync()
        captured.append(time.perf_counter() - t0)
        pool.release(snaps.pop())
    capture_s = timed(lambda: (snaps.append(trainer.capture()), pool.engine.wait()), sync)  # to its copies done
    want = state()  # what the capture holds
    for _ in range(2):
        step(trainer)
    moved = not all(torch.equal(x, y) for x, y in zip(state()[0], want[0]))
    restore_s = timed(lambda: trainer.restore(snaps.pop()), sync)  # returns once the bytes are on the device
    got = state()
    bitwise = all(torch.equal(x, y) for x, y in zip(got[0], want[0])) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(got[1], want[1]))
    adam = any("exp_avg" in d for d in want[1])
    step_s, with_capture, call = statistics.median(plain), statistics.median(captured), statistics.median(calls)
    failed = [] if bitwise and moved and adam else [f"restore bitwise {bitwise} (training had moved the state: "
                                                    f"{moved}; Adam state captured: {adam})"]
    overlap = None
    if trainer.ctx.device.type == "cuda":  # a CPU copies synchronously: nothing to overlap there
        overlap = call < 0.5 * capture_s and with_capture - step_s < capture_s
        failed += [] if pinned else ["host buffers are not pinned"]
        failed += [] if overlap else [f"the capture did not overlap the step: call {call:.3f} s, copy {capture_s:.3f} "
                                      f"s, step {step_s:.3f} s, with a capture {with_capture:.3f} s"]
    return {"snapshot": {
        "gb_per_state": gb, "pinned": pinned, "bitwise_restore": bitwise, "adam_state_included": adam,
        "capture_overlaps_step": overlap, "first_capture_seconds": first_s, "capture_seconds": capture_s,
        "capture_seconds_per_gb": capture_s / gb, "capture_call_seconds": call, "step_seconds": step_s,
        "step_with_capture_seconds": with_capture, "capture_cost_seconds": with_capture - step_s,
        "restore_seconds": restore_s, "restore_seconds_per_gb": restore_s / gb, "failed": "; ".join(failed),
        "summary": f"{gb:.2f} GB/state, pinned {pinned}, bitwise {bitwise}; capture {capture_s / gb:.3f} s/GB (costs "
                   f"{with_capture - step_s:+.3f} s on a {step_s:.3f} s step), restore {restore_s / gb:.3f} s/GB"}}


def check_host_syncs(trainer, steps: int, sync) -> dict:
    from msft_fast.training.step_audit import HostSyncAudit

    with HostSyncAudit(trainer.ctx.device) as audit:
        for _ in range(steps):
            step(trainer)
    # The loss (kernels/) gets its label count from the batch and must not read the device either.
    ours = [e for e in audit.events if (e.in_files("msft_fast/") and not e.in_files("msft_fast/data/"))
            or e.came_through("/kernels/")]
    read = [e for e in ours if e.stack[-1].endswith(" in read_to_host")]
    by_origin: dict[str, float] = {}
    for e in audit.events:
        origin = ("trainer reduction read" if e in read else "loss kernel (kernels/)" if e.came_through("/kernels/")
                  else "msft_fast (other)" if e in ours else
                  "msft_fast/data (host arrays)" if e.in_files("msft_fast/data/") else "libraries")
        by_origin[origin] = by_origin.get(origin, 0) + 1 / steps
    total = len(audit.events) / steps
    return {"host_syncs": {
        "mechanism": "CUDA sync debug mode" if trainer.ctx.device.type == "cuda" else
        "Python-level tensor reads (CPU: nothing synchronises)", "steps": steps, "per_step": by_origin,
        "total_per_step": total, "by_site": audit.by_site(), "goal_one_per_step": total == 1.0,
        "failed": "" if len(read) == steps and len(ours) == len(read) else
        f"msft_fast made {len(ours) / steps:g} host reads per step, expected 1 (its reduction): "
        f"{[e.where for e in ours if e not in read][:5]}",
        "summary": f"{total:g} per step ({', '.join(f'{k} {v:g}' for k, v in by_origin.items())})"}}


def check_reductions_and_timing(trainer, steps: int, sync) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from msft_fast.training.step_audit import GradientReductions

    units = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
    counts, micro, first = [], [], trainer.counters.steps_trained
    sync()
    t0 = time.perf_counter()
    for _ in range(2 * steps):
        c = trainer.counters
        micro.append(len(trainer.loader.step_plans(c.epoch, c.step_in_epoch)) // trainer.ctx.world_size)
        with GradientReductions() as counted:
            step(trainer)
        counts.append(counted.units)
    sync()
    wall = time.perf_counter() - t0
    trainer.log_finished_steps(wait=True)
    with open(trainer.metrics_path) as f:
        records = [json.loads(line) for line in f][first:first + 2 * steps]
    device_s = sum(r["step_seconds"] for r in records)
    split = {k: sum(r["time"][k] for r in records) / device_s for k in ("data", "fwd_bwd", "optimizer")}
    return {"grad_reductions": {
        "fsdp_units": units, "micro_batches_per_step": micro, "unit_reductions_per_step": counts,
        "failed": "" if counts == [units] * len(counts) else f"{counts} unit reductions per step, expected {units}",
        "summary": f"{statistics.mean(counts) / units:g} per FSDP unit per step ({statistics.mean(micro):g} "
                   "micro-batches per step)"},
        "time_split": {
        "steps": len(records), "wall_seconds": wall, "device_seconds": device_s, "device_over_wall": device_s / wall,
        "split": split, "failed": "" if 0.5 < device_s / wall <= 1.05 else
        f"the device marks cover {device_s / wall:.2f} of the wall time",
        "summary": f"device marks {device_s:.3f} s of {wall:.3f} s wall; data / fwd+bwd / optimizer "
                   + " / ".join(f"{100 * v:.0f}%" for v in split.values())}}


def check_memory(trainer, steps: int, sync) -> dict:
    import torch

    from msft_fast.runtime.preflight import GIB, estimate_run
    from msft_fast.training.trainer import peak_memory_gib

    device, lm = trainer.ctx.device, trainer.model.lm
    est = estimate_run(trainer.cfg, lm.config, trainer.ctx.world_size, trainer.param_dtype, device.type,
                       attention=lm.config._attn_implementation, num_params=sum(p.numel() for p in lm.parameters()))
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else peak_memory_gib(device)
    out = judge_preflight(est, peak, device.type)
    out["failed"] = "" if out.get("underestimate_within_10pct") is not False else \
        f"the preflight estimated {out['preflight_gib']:.2f} GiB, the steps took {peak:.2f} GiB"
    out["summary"] = f"preflight {out['preflight_gib']:.2f} GiB, {out['peak_kind']} {peak:.2f} GiB" + (
        f" (ratio {out['estimate_over_peak']:.2f})" if device.type == "cuda" else " (not comparable on a CPU)")
    return {"memory": out}


def _setup(s) -> dict:
    return {k: v for k, v in vars(s).items() if isinstance(v, (int, float, str, bool, list)) or v is None}


def _pct(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="ours vs HF at tiny shapes on the CPU: checks that it runs")
    p.add_argument("--variants", nargs="+", metavar="ATTN:COMPILE:AC", help="MFU per variant instead of ours vs HF")
    p.add_argument("--rollout", action="store_true", help="the 2-task mSFT roll-out instead of ours vs HF")
    p.add_argument("--check", action="store_true", help="the step loop's promises (exit 1 when one is broken)")
    p.add_argument("--steps", type=int, default=8, help="--variants, --rollout: optimizer steps (about)")
    p.add_argument("--sides", default=",".join(SIDES), help="which sides run, of " + ", ".join(SIDES))
    p.add_argument("--skip", type=int, help="steps left out of the steady figures (default: the setting's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side on a CPU (OMP_NUM_THREADS)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of ours vs HF, the side order rotated per round")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (then SIGKILL)")
    p.add_argument("--budget", type=float, default=0, help="--variants: seconds for all, from the start (0: none)")
    p.add_argument("--workdir", default="/tmp/bench_work/train")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--stem", help="--variants, --rollout, --check: output file names")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child: one side of one run
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--hf-batch-size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    if a.side:
        torch.set_num_threads(a.threads)
        r = run_ours(a.config, a.skip, a.device) if a.side == "ours" else \
            run_hf(a.config, a.skip, a.device, a.hf_batch_size, flatten=a.side == "hf_flat")
        print(json.dumps(r), flush=True)
        return r
    if a.quick and a.device == "cuda" or a.device == "cuda" and not torch.cuda.is_available():
        p.error("--quick is a CPU dry run" if a.quick else "--device cuda: no CUDA device is available here")
    a.workdir = os.path.abspath(a.workdir)
    names = ["quick"] if a.quick or (a.device == "cpu" and (a.variants or a.rollout or a.check)) else \
        ["cuda"] if a.device == "cuda" else ["small", "large"]
    if not set(a.sides.split(",")) <= set(SIDES):
        p.error(f"--sides: of {', '.join(SIDES)}, got {a.sides}")
    if not (a.variants or a.rollout or a.check):
        return versus_hf(a, names)
    s = setting(a, names[0])
    build_model_folder(s)
    return variants(a, s) if a.variants else rollout(a, s) if a.rollout else check(a, s)


if __name__ == "__main__":
    main()
