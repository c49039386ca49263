"""Trainer benchmark: `msft-fast train` (method sft: packed rows, fused per-task loss, FSDP2 at one rank)
against HF `transformers.Trainer` as users run it (padded batches from `DataCollatorForSeq2Seq`,
group_by_length off; on a GPU with FlashAttention-2 and Liger when installed), on the same model
folder, the same tokenized documents and the same number of epochs, side by side in one run.

Each side runs in its own process (its peak memory is its own: CUDA max allocated, or the process's
max RSS on a CPU) and trains every training document once per epoch. Reported: useful (non-padding)
tokens/s over the whole run and after the first `--skip` optimizer steps, and peak memory, as
ratios ours / HF. HF needs `accelerate`; without it the HF side prints one "HF Trainer not
available" line and ours is still measured.

The model is a random-init Llama-style folder (bench_train_gpu.py's, the char tokenizer), the data
two synthetic text tasks of log-uniform document lengths (bench_train_gpu.py's writer).

    python bench/bench_train.py                 # CPU: Llama 4x256, rows of 2048 tokens, a few minutes
    python bench/bench_train.py --device cuda   # Llama-3.2-1B shape, random init, seq 8192 packed
    python bench/bench_train.py --quick         # tiny shapes on the CPU, seconds: checks that it runs

Writes bench/results/train_<device>[_quick].json and .md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_msft import REPO, machine_info, write_outputs  # noqa: E402
from bench_train_gpu import build_model_folder, step_figures, write_text_tasks  # noqa: E402

HF_MISSING = "HF Trainer not available: pip install accelerate"
# Model shapes: hidden, intermediate, layers, heads, kv heads, vocab; rows: seq (longest document and
# packed row length), tokens per micro-batch, training tokens per task, shortest document.
SHAPES = {
    "cuda": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True,
                 seq=8192, tokens_per_batch=8192, task_tokens=100_000, min_len=256, skip=3, precision="bf16"),
    "cpu": dict(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=32000, tied=False,
                seq=512, tokens_per_batch=2048, task_tokens=12_000, min_len=32, skip=2, precision="fp32"),
    "quick": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, tied=True,
                  seq=128, tokens_per_batch=512, task_tokens=1200, min_len=16, skip=1, precision="fp32"),
}


# ---------------------------------------------------------------------------------------------
# The two sides, each in its own process: print one JSON line


def peak_memory(device: str) -> dict:
    import resource

    import torch

    if device == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "memory_kind": "CUDA max allocated"}
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "memory_kind": "max RSS"}


def run_ours(config_path: str, skip: int, device: str) -> dict:
    from msft_fast.cli import main as cli

    rc = cli(["train", "--config", config_path, "--overwrite"])
    if rc != 0:
        return {"status": "failed", "why": f"msft-fast train exited {rc}"}
    import yaml

    with open(config_path) as f:
        out = yaml.safe_load(f)["output_dir"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    with open(os.path.join(out, "history.json")) as f:
        totals = json.load(f)["totals"]
    steady = step_figures(steps, skip)
    return {"status": "ok", "attn_implementation": _auto_attention(device, out), "optimizer_steps": len(steps),
            "useful_tokens": sum(s["tokens"] for s in steps), "loss_tokens": sum(s["loss_tokens"] for s in steps),
            "train_seconds": sum(s["step_seconds"] for s in steps),
            "steady_tokens": sum(s["tokens"] for s in steps[skip:]), "steady_seconds":
            sum(s["step_seconds"] for s in steps[skip:]), "final_loss": steps[-1]["loss"],
            "mfu": steady["mfu"], **peak_memory(device),
            # Training's peak (the trainer's step records: the same measure, up to the last step), so that
            # the export of the final model after training is not counted; the process's, for reference.
            "peak_mem_gib": max(s["peak_mem_gib"] for s in steps),
            "process_peak_mem_gib": totals.get("peak_mem_gib")}


def _auto_attention(device: str, out: str) -> str:
    """The backend `model.attn_implementation: auto` picks here (the trainer logs it; history.json has no field)."""
    import torch

    from msft_fast.model import choose_attention

    with open(os.path.join(out, "config.yaml")) as f:
        import yaml

        precision = yaml.safe_load(f)["train"]["precision"]
    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device == "cuda") else torch.float32
    return choose_attention("auto", torch.device(device), dtype)


def run_hf(config_path: str, skip: int, device: str, batch_size: int) -> dict:
    """HF Trainer on the documents msft-fast tokenized for the same config (msft_fast's own loader,
    so both sides train the very same token ids and trained positions)."""
    if importlib.util.find_spec("accelerate") is None:
        print(HF_MISSING, flush=True)
        return {"status": "not available", "why": HF_MISSING}
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from msft_fast.config import load_config
    from msft_fast.data.tasks import load_tasks

    cfg = load_config(config_path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    examples = []
    for task in load_tasks(cfg.data, tokenizer):
        d = task.train
        for s, n in zip(d.starts, d.lengths):
            ids = d.input_ids[s : s + n].tolist()
            shifted = d.labels[s : s + n].tolist()  # target of position i; HF shifts its labels itself
            examples.append({"input_ids": ids, "labels": [-100] + shifted[:-1]})
    cuda = device == "cuda"
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    attn = "flash_attention_2" if flash else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False  # training: no KV cache
    t = cfg.train
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(cfg.output_dir), "hf_trainer"), per_device_train_batch_size=batch_size,
        num_train_epochs=t.epochs, learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=t.weight_decay, adam_beta1=t.beta1, adam_beta2=t.beta2, max_grad_norm=t.grad_clip,
        seed=t.seed, bf16=cuda, optim="adamw_torch_fused" if cuda else "adamw_torch", use_liger_kernel=liger,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10**9,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=cuda, use_cpu=not cuda,
        **sampling_kwargs())
    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    useful, padded = [], []

    def collate(features):  # counts useful and padded tokens of every micro-batch, in order
        batch = pad_collator(features)
        useful.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        return batch

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    timer = StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[timer])
    out = trainer.train()
    seconds = [b - a for a, b in zip([timer.start] + timer.ends[:-1], timer.ends)]
    steps = len(seconds)  # one micro-batch per optimizer step (no gradient accumulation)
    return {"status": "ok", "attn_implementation": attn, "liger": liger, "batch_size": batch_size,
            "optimizer_steps": steps, "useful_tokens": sum(useful[:steps]), "padded_tokens": sum(padded[:steps]),
            "train_seconds": sum(seconds), "steady_tokens": sum(useful[skip:steps]),
            "steady_seconds": sum(seconds[skip:]), "final_loss": out.training_loss,
            "hf_train_runtime": out.metrics.get("train_runtime"), **peak_memory(device)}


def sampling_kwargs() -> dict:
    """Random batches, no grouping by length: `train_sampling_strategy` in transformers 5, `group_by_length`
    before."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "random"}
    return {"group_by_length": False} if "group_by_length" in names else {}


# ---------------------------------------------------------------------------------------------
# The benchmark: one model folder and data set, then each side in its own subprocess


def write_config(a, workdir: str, model_dir: str) -> str:
    import yaml

    tasks = write_text_tasks(os.path.join(workdir, f"data_{a.seq}_{a.task_tokens}"), a.task_tokens, a.seq,
                             a.min_len, a.seq - 2)
    config = {"method": "sft", "output_dir": os.path.join(workdir, "runs", "msft_fast"),
              "model": {"path": model_dir, "attn_implementation": "auto"},
              "data": {"tasks": tasks, "max_seq_len": a.seq, "tokens_per_batch": a.tokens_per_batch,
                       "cache_dir": os.path.join(workdir, "cache")},
              "train": {"lr": 1e-4, "epochs": a.epochs, "seed": 0, "warmup_steps": 0, "schedule": "constant",
                        "weight_decay": 0.0, "grad_clip": 1.0, "precision": a.precision, "progress": False,
                        "log_every": 1, "checkpoint_every": 0},
              "msft": {"evals_per_epoch": 1}}
    path = os.path.join(workdir, "msft_fast.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def run_side(a, side: str, config_path: str) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if a.device == "cpu":
        env["OMP_NUM_THREADS"] = str(a.threads)
    if side == "hf" and a.hf_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([a.hf_pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--config", config_path, "--device", a.device,
           "--skip", str(a.skip), "--hf-batch-size", str(a.hf_batch_size), "--threads", str(a.threads)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env, cwd=a.workdir)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "why": f"after {a.timeout}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"status"')]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "failed", "why": " | ".join(tail)[-400:]}
    r = json.loads(lines[-1])
    r["process_wall_seconds"] = time.time() - t0
    for key in ("train", "steady"):
        if r.get(f"{key}_seconds"):
            r[f"{key}_tokens_per_s"] = r["useful_tokens" if key == "train" else "steady_tokens"] / r[f"{key}_seconds"]
    return r


def median_run(runs: list[dict]) -> dict:
    """The run with the median whole-run tokens/s (the lower middle one), with every run's figure."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["train_tokens_per_s"])
    if not ok:
        return runs[-1]
    return ok[(len(ok) - 1) // 2] | {"all_train_tokens_per_s": [r["train_tokens_per_s"] for r in ok],
                                     "all_peak_mem_gib": [r["peak_mem_gib"] for r in ok]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: checks that the bench runs")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--task-tokens", type=int, help="training tokens per task (2 tasks)")
    p.add_argument("--seq", type=int, help="longest document = packed row length")
    p.add_argument("--tokens-per-batch", type=int, help="ours: tokens per packed micro-batch")
    p.add_argument("--hf-batch-size", type=int, help="HF rows per batch (default: tokens-per-batch // seq, so that "
                   "neither side's micro-batch holds more than tokens-per-batch tokens)")
    p.add_argument("--skip", type=int, help="first optimizer steps of each side left out of the steady figure")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side on a CPU (OMP_NUM_THREADS)")
    p.add_argument("--order", default="ours,hf", help="which side runs first")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, in pairs that alternate which side "
                   "goes first; the median run of each side is reported")
    p.add_argument("--hf-pythonpath", help="extra import path for the HF side only (e.g. a `pip install --target` "
                   "folder holding accelerate)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per side")
    p.add_argument("--workdir", default="/tmp/bench_work/train")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--side", choices=("ours", "hf"), help=argparse.SUPPRESS)  # child process
    p.add_argument("--config", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick and a.device == "cuda":
        p.error("--quick is a CPU dry run")
    shape = SHAPES["quick" if a.quick else a.device]
    for key, value in shape.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    a.hf_batch_size = a.hf_batch_size or max(1, a.tokens_per_batch // a.seq)
    if a.side:
        import torch

        if a.device == "cpu":
            torch.set_num_threads(a.threads)
        run = run_ours(a.config, a.skip, a.device) if a.side == "ours" else \
            run_hf(a.config, a.skip, a.device, a.hf_batch_size)
        print(json.dumps(run), flush=True)
        return run
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_train.py --device cuda: no CUDA device is available here.")
    os.makedirs(a.workdir, exist_ok=True)
    a.workdir = os.path.abspath(a.workdir)
    model_dir = os.path.join(a.workdir, f"llama_{a.layers}x{a.hidden}_v{a.vocab}")
    build_model_folder(model_dir, argparse.Namespace(**vars(a)))
    config_path = write_config(a, a.workdir, model_dir)
    runs: dict[str, list[dict]] = {}
    order = a.order.split(",")
    for i in range(a.repeats):  # pairs alternate which side goes first: the shared machine drifts
        for side in order if i % 2 == 0 else order[::-1]:
            r = run_side(a, side, config_path)
            runs.setdefault(side, []).append(r)
            print(f"{side}: " + (f"{r['train_tokens_per_s']:.0f} useful tokens/s, peak {r['peak_mem_gib']:.3f} GiB "
                                 f"({r['memory_kind']}), {r['optimizer_steps']} steps"
                                 if r["status"] == "ok" else f"{r['status']}: {r['why']}"), flush=True)
    sides = {side: median_run(rs) for side, rs in runs.items()}
    ours, hf = sides.get("ours", {}), sides.get("hf", {})
    ratios = {}
    if ours.get("status") == "ok" and hf.get("status") == "ok":
        # Each pair ran back to back, so its ratio is less exposed to the machine's drift than the medians.
        pairs = [(o["train_tokens_per_s"] / h["train_tokens_per_s"],
                  o["steady_tokens_per_s"] / h["steady_tokens_per_s"], o["peak_mem_gib"] / h["peak_mem_gib"])
                 for o, h in zip(runs["ours"], runs["hf"]) if o["status"] == "ok" and h["status"] == "ok"]
        ratios = {"tokens_per_s_ours_over_hf": statistics.median(x[0] for x in pairs),
                  "steady_tokens_per_s_ours_over_hf": statistics.median(x[1] for x in pairs),
                  "peak_memory_ours_over_hf": statistics.median(x[2] for x in pairs),
                  "tokens_per_s_ours_over_hf_per_pair": [x[0] for x in pairs],
                  "hf_padding_fraction": 1 - hf["useful_tokens"] / hf["padded_tokens"],
                  "same_useful_tokens": ours["useful_tokens"] == hf["useful_tokens"]}
    device = a.device + ("_quick" if a.quick else "")
    report = {
        "what": "training runs over the same documents (same model folder, token ids, epochs), each side in its own "
                "process: useful (non-padding) tokens/s over all optimizer steps and after the first --skip, peak "
                "memory of the process (CUDA max allocated; max RSS on a CPU, interpreter and libraries included); "
                "the median of --repeats runs per side; ratios ours / HF",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info() | {"accelerate_for_hf": _hf_accelerate_version(a)},
        "setup": {k: v for k, v in vars(a).items() if k not in ("side", "config")} | {"config": config_path},
        "results": {"msft_fast": ours, "hf_trainer": hf},
        "ratios": ratios,
    }
    m = report["machine"]
    where = m.get("gpu") or f"CPU ({m['cpu']}), {m['cores']} cores, {a.threads} torch thread(s) per side"
    lines = [f"# msft-fast train vs HF Trainer on {where}", "",
             f"{report['date']}, torch {m['torch']}, transformers {m['transformers']}, accelerate "
             f"{m['accelerate_for_hf'] or 'missing'}; Llama {a.layers}x{a.hidden}, vocab {a.vocab}, {a.precision}, "
             f"{a.epochs:g} epoch of 2 tasks x {a.task_tokens} tokens (documents {a.min_len}-{a.seq - 2} tokens); "
             f"ours: packed micro-batches of {a.tokens_per_batch} tokens; HF: {a.hf_batch_size} padded rows per batch; "
             f"median of {a.repeats} run(s) per side, alternating which goes first",
             "", "| side | status | useful tokens/s | steady tokens/s | peak GiB | optimizer steps | useful tokens | "
             "final loss |", "|---|---|---|---|---|---|---|---|"]
    for name, r in (("msft_fast", ours), ("hf_trainer", hf)):
        if r.get("status") == "ok":
            lines.append(f"| {name} ({r['attn_implementation']}) | ok | {r['train_tokens_per_s']:.0f} | "
                         f"{r.get('steady_tokens_per_s', 0):.0f} | {r['peak_mem_gib']:.3f} | {r['optimizer_steps']} | "
                         f"{r['useful_tokens']} | {r['final_loss']:.3f} |")
        else:
            lines.append(f"| {name} | {r.get('status')}: {r.get('why')} | | | | | | |")
    if ratios:
        lines += ["", f"ours / HF (median over pairs run back to back): tokens/s "
                      f"{ratios['tokens_per_s_ours_over_hf']:.2f}x (steady "
                      f"{ratios['steady_tokens_per_s_ours_over_hf']:.2f}x), peak memory "
                      f"{ratios['peak_memory_ours_over_hf']:.2f}x; HF batches were "
                      f"{100 * ratios['hf_padding_fraction']:.1f}% padding; tokens/s ratio per pair: "
                      + ", ".join(f"{x:.2f}" for x in ratios["tokens_per_s_ours_over_hf_per_pair"])]
    write_outputs(a.out, f"train_{device}", report, lines)
    return report


def _hf_accelerate_version(a):
    env = dict(os.environ)
    if a.hf_pythonpath:
        env["PYTHONPATH"] = a.hf_pythonpath
    proc = subprocess.run([sys.executable, "-c", "import accelerate; print(accelerate.__version__)"],
                          capture_output=True, text=True, env=env)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    main()
