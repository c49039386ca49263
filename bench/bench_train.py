"""Trainer benchmark: `msft-fast train` (method sft: packed rows, fused per-task loss) against HF
`transformers.Trainer` as users run it, in two ways: padded batches (`DataCollatorForSeq2Seq`) and
padding-free batches (`DataCollatorWithFlattening`: each batch's rows concatenated into one, with
position ids restarting per document, which HF turns into a document mask). Same model folder, same
tokenized documents, same number of epochs; group_by_length off; on a GPU FlashAttention-2 and
Liger when installed.

Each side runs in its own process (its peak memory is its own: CUDA max allocated, or the process's
max RSS on a CPU) and trains every training document once per epoch. Reported per setting: useful
(non-padding) tokens/s over the whole run and after the first `--skip` optimizer steps, peak memory,
and ratios ours / HF. With `--repeats N` the sides run in N rounds, each round every setting and
every side once, the order rotated (A B C, B C A, C A B, ...), so that a shared machine's drift
falls on all sides alike; a ratio is the median over rounds of ratios within a round. How busy the
machine was is measured too: the CPU time other processes used during each run (/proc/stat).

CPU settings (both by default, `--settings` to pick):
    small  Llama 2x128 (0.47M parameters), vocab 384, documents 10-40 tokens; ours 512 tokens per
           packed micro-batch, HF batches of 32 rows
    large  Llama 4x256, vocab 32000, documents 34-512 tokens; ours 2048 tokens per micro-batch, HF 4 rows

    python bench/bench_train.py --repeats 5     # CPU, both settings, about 25 minutes on 2 cores
    python bench/bench_train.py --device cuda   # Llama-3.2-1B shape, random init, seq 8192 packed
    python bench/bench_train.py --quick         # tiny shapes on the CPU, seconds: checks that it runs

The model is a random-init Llama-style folder (bench_train_gpu.py's, the char tokenizer), the data
two synthetic text tasks of log-uniform document lengths (bench_train_gpu.py's writer). HF needs
`accelerate`; without it the HF sides print one "HF Trainer not available" line and ours is still
measured. Writes bench/results/train_<device>[_quick].json and .md.
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
# Model shapes: hidden, intermediate, layers, heads, kv heads, vocab; rows: seq (longest document =
# data.max_seq_len), tokens per micro-batch (ours), HF rows per batch, training tokens per task,
# shortest and longest document in characters (+2 tokens: BOS, EOS).
SETTINGS = {
    "cuda": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True,
                 seq=8192, tokens_per_batch=8192, hf_batch_size=1, task_tokens=100_000, min_len=256, skip=3,
                 precision="bf16", epochs=1.0),
    "small": dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2, vocab=384, tied=False,
                  seq=40, tokens_per_batch=512, hf_batch_size=32, task_tokens=40_000, min_len=8, skip=4,
                  precision="fp32", epochs=1.0),
    "large": dict(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=32000, tied=False,
                  seq=512, tokens_per_batch=2048, hf_batch_size=4, task_tokens=12_000, min_len=32, skip=2,
                  precision="fp32", epochs=1.0),
    "quick": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, tied=True,
                  seq=128, tokens_per_batch=512, hf_batch_size=4, task_tokens=1200, min_len=16, skip=1,
                  precision="fp32", epochs=1.0),
}
DEFAULT_SETTINGS = {"cpu": "small,large", "cuda": "cuda", "quick": "quick"}
SIDES = ("ours", "hf", "hf_flat")
SIDE_NAMES = {"ours": "msft_fast", "hf": "hf_trainer", "hf_flat": "hf_trainer_flat"}
SIDE_LABELS = {"ours": "msft-fast", "hf": "HF Trainer, padded", "hf_flat": "HF Trainer, padding-free"}


# ---------------------------------------------------------------------------------------------
# The sides, each in its own process: print one JSON line


def peak_memory(device: str) -> dict:
    import resource

    import torch

    if device == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "memory_kind": "CUDA max allocated"}
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "memory_kind": "max RSS"}


def run_ours(config_path: str, skip: int, device: str) -> dict:
    import torch

    from msft_fast.cli import main as cli
    from msft_fast.runtime.distributed import needs_fsdp
    from msft_fast.training.trainer import Trainer

    # This process's CPU time in each optimizer step (the same span as the trainer's step_seconds):
    # on a shared machine it moves less than the wall time when other processes take the cores.
    cpu_seconds, train_step = [], Trainer.train_step

    def timed_step(self):
        t0 = time.process_time()
        train_step(self)
        cpu_seconds.append(time.process_time() - t0)

    Trainer.train_step = timed_step
    rc = cli(["train", "--config", config_path, "--overwrite"])
    if rc != 0:
        return {"status": "failed", "why": f"msft-fast train exited {rc}"}
    import yaml

    with open(config_path) as f:
        out = yaml.safe_load(f)["output_dir"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    totals = history["totals"]
    steady = step_figures(steps, skip)
    dtype = getattr(torch, history["compute_dtype"])
    return {"status": "ok", "attn_implementation": history["attn_implementation"],
            "fsdp2": needs_fsdp(dtype, torch.device(device)),  # one process here: what train.fsdp=auto chose
            "optimizer_steps": len(steps),
            "useful_tokens": sum(s["tokens"] for s in steps), "loss_tokens": sum(s["loss_tokens"] for s in steps),
            "train_seconds": sum(s["step_seconds"] for s in steps), "train_cpu_seconds": sum(cpu_seconds),
            "steady_tokens": sum(s["tokens"] for s in steps[skip:]), "steady_seconds":
            sum(s["step_seconds"] for s in steps[skip:]), "final_loss": steps[-1]["loss"],
            "mfu": steady["mfu"], **peak_memory(device),
            # Training's peak (the trainer's step records: the same measure, up to the last step), so that
            # the export of the final model after training is not counted; the process's, for reference.
            "peak_mem_gib": max(s["peak_mem_gib"] for s in steps),
            "process_peak_mem_gib": totals.get("peak_mem_gib")}


def run_hf(config_path: str, skip: int, device: str, batch_size: int, flatten: bool) -> dict:
    """HF Trainer on the documents msft-fast tokenized for the same config (msft_fast's own loader,
    so both sides train the very same token ids and trained positions). `flatten`: padding-free
    batches from `DataCollatorWithFlattening`, else padded ones from `DataCollatorForSeq2Seq`."""
    if importlib.util.find_spec("accelerate") is None:
        print(HF_MISSING, flush=True)
        return {"status": "not available", "why": HF_MISSING}
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments)

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
    # Training: no KV cache (with one, HF would also ignore the documents' restarting position ids).
    model.config.use_cache = False
    t = cfg.train
    # The optimizer is HF's default (`adamw_torch_fused` with torch >= 2.8, on every device).
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(cfg.output_dir), "hf_trainer"), per_device_train_batch_size=batch_size,
        num_train_epochs=t.epochs, learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=t.weight_decay, adam_beta1=t.beta1, adam_beta2=t.beta2, max_grad_norm=t.grad_clip,
        seed=t.seed, bf16=cuda, use_liger_kernel=liger,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10**9,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=cuda, use_cpu=not cuda,
        **sampling_kwargs())
    # Padding-free: the documents' own labels (first one -100, no prediction across documents) and
    # position ids; no attention mask, so HF derives the document mask from the position ids.
    collator = DataCollatorWithFlattening() if flatten else \
        DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    useful, padded = [], []

    def collate(features):  # counts useful and padded tokens of every micro-batch, in order
        batch = collator(features)
        total = batch["input_ids"].numel()
        useful.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else total)
        padded.append(total)
        return batch

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []

        def on_train_begin(self, *_, **__):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

    timer = StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[timer])
    out = trainer.train()
    seconds = [b - a for a, b in zip([timer.start] + timer.ends[:-1], timer.ends)]
    steps = len(seconds)  # one micro-batch per optimizer step (no gradient accumulation)
    return {"status": "ok", "attn_implementation": attn, "liger": liger, "batch_size": batch_size,
            "collator": type(collator).__name__, "optim": str(args.optim.value if hasattr(args.optim, "value")
                                                                 else args.optim),
            "optimizer_steps": steps, "useful_tokens": sum(useful[:steps]), "padded_tokens": sum(padded[:steps]),
            "train_seconds": sum(seconds), "train_cpu_seconds": timer.cpu_ends[-1] - timer.cpu_start,
            "steady_tokens": sum(useful[skip:steps]),
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
# How busy the machine is: CPU time of every process (/proc/stat) minus this benchmark's own


class MachineLoad:
    """Cores' worth of CPU time that processes other than this benchmark (and its children) used
    between `start()` and `stop()`. Linux only: None elsewhere."""

    def __init__(self):
        self._start = None

    @staticmethod
    def _sample():
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        own = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for k in ("ru_utime", "ru_stime"))
        return time.time(), busy / os.sysconf("SC_CLK_TCK"), own

    def start(self) -> "MachineLoad":
        self._start = self._sample()
        return self

    def stop(self) -> dict:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return {"other_processes_cores": None, "loadavg_1min": os.getloadavg()[0]}
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return {"other_processes_cores": max(0.0, others / wall), "loadavg_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------
# The benchmark: per setting one model folder and data set, then each side in its own subprocess


def setting_args(a, name: str) -> argparse.Namespace:
    """The setting's shape, with any value given on the command line in its place."""
    s = argparse.Namespace(**vars(a))
    s.setting = name
    for key, value in SETTINGS[name].items():
        if getattr(a, key, None) is None:
            setattr(s, key, value)
    s.workdir = os.path.join(a.workdir, name)
    return s


def write_config(s) -> str:
    import yaml

    tasks = write_text_tasks(os.path.join(s.workdir, f"data_{s.seq}_{s.task_tokens}_{s.min_len}"), s.task_tokens,
                             s.seq, s.min_len, s.seq - 2)
    config = {"method": "sft", "output_dir": os.path.join(s.workdir, "runs", "msft_fast"),
              "model": {"path": s.model_dir, "attn_implementation": "auto"},
              "data": {"tasks": tasks, "max_seq_len": s.seq, "tokens_per_batch": s.tokens_per_batch,
                       "cache_dir": os.path.join(s.workdir, "cache")},
              "train": {"lr": 1e-4, "epochs": s.epochs, "seed": 0, "warmup_steps": 0, "schedule": "constant",
                        "weight_decay": 0.0, "grad_clip": 1.0, "precision": s.precision, "progress": False,
                        "log_every": 1, "checkpoint_every": 0},
              "msft": {"evals_per_epoch": 1}}
    path = os.path.join(s.workdir, "msft_fast.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def prepare(s) -> None:
    os.makedirs(s.workdir, exist_ok=True)
    s.model_dir = os.path.join(s.workdir, f"llama_{s.layers}x{s.hidden}_v{s.vocab}")
    build_model_folder(s.model_dir, s)
    s.config_path = write_config(s)


def run_side(s, side: str) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if s.device == "cpu":
        env["OMP_NUM_THREADS"] = str(s.threads)
    if side != "ours" and s.hf_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([s.hf_pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--config", s.config_path, "--device", s.device,
           "--skip", str(s.skip), "--hf-batch-size", str(s.hf_batch_size), "--threads", str(s.threads)]
    t0 = time.time()
    load = MachineLoad().start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=s.timeout, env=env, cwd=s.workdir)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "why": f"after {s.timeout}s", "load": load.stop()}
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"status"')]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "failed", "why": " | ".join(tail)[-400:], "load": load.stop()}
    r = json.loads(lines[-1])
    r["load"] = load.stop()
    r["process_wall_seconds"] = time.time() - t0
    for key in ("train", "steady", "train_cpu"):
        if r.get(f"{key}_seconds"):
            r[f"{key}_tokens_per_s"] = r["steady_tokens" if key == "steady" else "useful_tokens"] / r[f"{key}_seconds"]
    return r


def median_run(runs: list[dict]) -> dict:
    """The run with the median whole-run tokens/s (the lower middle one), with every run's figure."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["train_tokens_per_s"])
    if not ok:
        return runs[-1]
    return ok[(len(ok) - 1) // 2] | {"all_train_tokens_per_s": [r["train_tokens_per_s"] for r in ok],
                                     "all_peak_mem_gib": [r["peak_mem_gib"] for r in ok]}


def round_ratios(runs: dict[str, list[dict]], peer: str) -> dict:
    """Ours over `peer`, per round (the two ran in the same round, minutes apart), and their medians."""
    rounds = [(o, p) for o, p in zip(runs.get("ours", []), runs.get(peer, []))
              if o["status"] == "ok" and p["status"] == "ok"]
    if not rounds:
        return {}
    per = [(o["train_tokens_per_s"] / p["train_tokens_per_s"], o["steady_tokens_per_s"] / p["steady_tokens_per_s"],
            o["peak_mem_gib"] / p["peak_mem_gib"], o["train_cpu_tokens_per_s"] / p["train_cpu_tokens_per_s"])
           for o, p in rounds]
    return {"tokens_per_s": statistics.median(x[0] for x in per),
            "steady_tokens_per_s": statistics.median(x[1] for x in per),
            "peak_memory": statistics.median(x[2] for x in per),
            "tokens_per_cpu_s": statistics.median(x[3] for x in per),
            "tokens_per_s_per_round": [x[0] for x in per],
            "same_useful_tokens": all(o["useful_tokens"] == p["useful_tokens"] for o, p in rounds)}


def summarise(s, runs: dict[str, list[dict]]) -> dict:
    sides = {SIDE_NAMES[side]: median_run(rs) for side, rs in runs.items()}
    hf = sides.get("hf_trainer", {})
    ratios = {"over_hf_padded": round_ratios(runs, "hf"), "over_hf_flat": round_ratios(runs, "hf_flat")}
    if hf.get("status") == "ok":
        ratios["hf_padding_fraction"] = 1 - hf["useful_tokens"] / hf["padded_tokens"]
    setup = {k: getattr(s, k) for k in SETTINGS[s.setting]} | {"config": s.config_path, "threads": s.threads}
    return {"setup": setup, "results": sides, "ratios": ratios, "runs": {SIDE_NAMES[k]: v for k, v in runs.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: checks that the bench runs")
    p.add_argument("--settings", help=f"comma-separated, of {', '.join(SETTINGS)} (default: small,large on a CPU)")
    p.add_argument("--sides", default=",".join(SIDES), help="which sides run, of " + ", ".join(SIDES))
    p.add_argument("--epochs", type=float)
    p.add_argument("--task-tokens", type=int, help="training tokens per task (2 tasks)")
    p.add_argument("--seq", type=int, help="longest document (data.max_seq_len)")
    p.add_argument("--tokens-per-batch", type=int, help="ours: tokens per packed micro-batch")
    p.add_argument("--hf-batch-size", type=int, help="HF rows per batch (both HF sides)")
    p.add_argument("--skip", type=int, help="first optimizer steps of each side left out of the steady figure")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side on a CPU (OMP_NUM_THREADS)")
    p.add_argument("--repeats", type=int, default=1, help="rounds; each runs every setting and side once, the "
                   "side order rotated from round to round; the median run of each side is reported")
    p.add_argument("--hf-pythonpath", help="extra import path for the HF sides only (e.g. a `pip install --target` "
                   "folder holding accelerate)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per side")
    p.add_argument("--workdir", default="/tmp/bench_work/train")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child process
    p.add_argument("--config", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick and a.device == "cuda":
        p.error("--quick is a CPU dry run")
    if a.side:  # a child: one side of one setting
        import torch

        if a.device == "cpu":
            torch.set_num_threads(a.threads)
        run = run_ours(a.config, a.skip, a.device) if a.side == "ours" else \
            run_hf(a.config, a.skip, a.device, a.hf_batch_size, flatten=a.side == "hf_flat")
        print(json.dumps(run), flush=True)
        return run
    names = (a.settings or DEFAULT_SETTINGS["quick" if a.quick else a.device]).split(",")
    unknown = [n for n in names if n not in SETTINGS]
    sides = a.sides.split(",")
    if unknown or not set(sides) <= set(SIDES):
        p.error(f"unknown setting or side: {unknown or sides}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_train.py --device cuda: no CUDA device is available here.")
    os.makedirs(a.workdir, exist_ok=True)
    a.workdir = os.path.abspath(a.workdir)
    settings = {name: setting_args(a, name) for name in names}
    for s in settings.values():
        prepare(s)
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in names}
    started, load = time.strftime("%Y-%m-%d %H:%M"), MachineLoad().start()
    for i in range(a.repeats):  # rounds rotate the side order: the shared machine drifts
        order = sides[i % len(sides):] + sides[:i % len(sides)]
        for name, s in settings.items():
            for side in order:
                r = run_side(s, side)
                runs[name].setdefault(side, []).append(r)
                other = r["load"]["other_processes_cores"]
                print(f"round {i + 1} {name} {side}: " + (
                    f"{r['train_tokens_per_s']:.0f} useful tokens/s, peak {r['peak_mem_gib']:.3f} GiB "
                    f"({r['memory_kind']}), {r['optimizer_steps']} steps" if r["status"] == "ok" else
                    f"{r['status']}: {r['why']}") + (f"; other processes {other:.2f} cores" if other is not None
                                                     else ""), flush=True)
    whole = load.stop()
    device = a.device + ("_quick" if a.quick else "")
    report = {
        "what": "training runs over the same documents (same model folder, token ids, epochs), each side in its own "
                "process: useful (non-padding) tokens/s over all optimizer steps and after the first --skip, peak "
                "memory of the process (CUDA max allocated; max RSS on a CPU, interpreter and libraries included); "
                "the median run of --repeats per side; ratios ours / HF: the median over rounds of the ratio "
                "within a round",
        "date": started,
        "machine": machine_info() | {"accelerate_for_hf": _hf_accelerate_version(a)},
        "load": {"other_processes_cores_whole_run": whole["other_processes_cores"],
                 "other_processes_cores_per_run": [r["load"]["other_processes_cores"] for rs in runs.values()
                                                   for side in rs.values() for r in side],
                 "loadavg_1min_per_run": [r["load"]["loadavg_1min"] for rs in runs.values()
                                          for side in rs.values() for r in side]},
        "sides": sides, "repeats": a.repeats, "threads": a.threads,
        "settings": {name: summarise(s, runs[name]) for name, s in settings.items()},
    }
    # Flat ratios for scripts that print them (bench/gpu_check.sh)
    report["ratios"] = {f"{name} {key} {k}": v for name, st in report["settings"].items()
                        for key in ("over_hf_padded", "over_hf_flat") for k, v in st["ratios"][key].items()
                        if isinstance(v, float)}
    write_outputs(a.out, f"train_{device}", report, markdown(report, settings))
    return report


def markdown(report: dict, settings: dict) -> list[str]:
    m = report["machine"]
    where = m.get("gpu") or f"CPU ({m['cpu']}), {m['cores']} cores, {report['threads']} torch thread(s) per side " \
                              f"(OMP_NUM_THREADS={report['threads']})"
    load = report["load"]
    per_run = [x for x in load["other_processes_cores_per_run"] if x is not None]
    busy = (f"other processes kept {load['other_processes_cores_whole_run']:.2f} of the {m['cores']} cores busy on "
            f"average over the benchmark ({min(per_run):.2f}-{max(per_run):.2f} during single runs; /proc/stat "
            f"minus this benchmark's own CPU time); 1-minute load average "
            f"{min(load['loadavg_1min_per_run']):.2f}-{max(load['loadavg_1min_per_run']):.2f}"
            if per_run and load["other_processes_cores_whole_run"] is not None else "load not measured")
    lines = [f"# msft-fast train vs HF Trainer (padded and padding-free) on {where}", "",
             f"{report['date']}, torch {m['torch']}, transformers {m['transformers']}, accelerate "
             f"{m['accelerate_for_hf'] or 'missing'}; {report['repeats']} round(s), each running every setting and "
             f"side once, the side order rotated per round; {busy}.", ""]
    for name, st in report["settings"].items():
        s = settings[name]
        lines += [f"## {name}: Llama {s.layers}x{s.hidden}, vocab {s.vocab}, {s.precision}", "",
                  f"{s.epochs:g} epoch of 2 tasks x {s.task_tokens} tokens, documents {s.min_len + 2}-{s.seq} tokens "
                  f"(log-uniform); ours: packed micro-batches of {s.tokens_per_batch} tokens; HF: {s.hf_batch_size} "
                  f"rows per batch, padded (`DataCollatorForSeq2Seq`) or flattened into one row "
                  f"(`DataCollatorWithFlattening`, position ids); median run of each side", "",
                  "| side | attention | useful tokens/s | steady tokens/s | tokens per CPU s | peak GiB | optimizer "
                  "steps | useful tokens | final loss | tokens/s per run |", "|---" * 10 + "|"]
        for side in report["sides"]:
            r = st["results"].get(SIDE_NAMES[side], {})
            label = SIDE_LABELS[side]
            if r.get("status") == "ok":
                extra = f", {r['optim']}" if r.get("optim") else (", no FSDP2" if r.get("fsdp2") is False else "")
                lines.append(f"| {label} | {r['attn_implementation']}{extra} | {r['train_tokens_per_s']:.0f} | "
                             f"{r.get('steady_tokens_per_s', 0):.0f} | {r['train_cpu_tokens_per_s']:.0f} | "
                             f"{r['peak_mem_gib']:.3f} | "
                             f"{r['optimizer_steps']} | {r['useful_tokens']} | {r['final_loss']:.3f} | "
                             + ", ".join(f"{x:.0f}" for x in r["all_train_tokens_per_s"]) + " |")
            else:
                lines.append(f"| {label} | {r.get('status')}: {r.get('why')} | | | | | | | | |")
        lines.append("")
        for key, peer in (("over_hf_padded", "padded"), ("over_hf_flat", "padding-free")):
            x = st["ratios"][key]
            if x:
                lines.append(f"- ours / HF {peer}: tokens/s **{x['tokens_per_s']:.2f}x** (steady "
                             f"{x['steady_tokens_per_s']:.2f}x; per CPU second of the training process "
                             f"{x['tokens_per_cpu_s']:.2f}x), peak memory {x['peak_memory']:.2f}x; per round: "
                             + ", ".join(f"{v:.2f}" for v in x["tokens_per_s_per_round"]))
        if "hf_padding_fraction" in st["ratios"]:
            lines.append(f"- HF's padded batches were {100 * st['ratios']['hf_padding_fraction']:.1f}% padding")
        lines.append("")
    return lines


def _hf_accelerate_version(a):
    env = dict(os.environ)
    if a.hf_pythonpath:
        env["PYTHONPATH"] = a.hf_pythonpath
    proc = subprocess.run([sys.executable, "-c", "import accelerate; print(accelerate.__version__)"],
                          capture_output=True, text=True, env=env)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    main()
