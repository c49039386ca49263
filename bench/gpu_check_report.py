"""bench/gpu_check.sh's Python side:

    python bench/gpu_check_report.py setup  --mode gpu --work WORK --out OUT
    python bench/gpu_check_report.py render --mode gpu --work WORK --out OUT --budget 300 --wall 120 [--final]

setup: the machine (WORK/machine.json), package versions, and every import with the last line of its
traceback when it fails (OUT/imports.json); exit 1 when a module a part needs does not import. render,
after every part: what the parts wrote so far as OUT/gpu_check.json, .md and gpu_check_logs.txt, each
written whole, reading JSON and markdown only (no torch: well under a second).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_outputs  # noqa: E402 - imports nothing heavy: render stays well under a second

PACKAGES = ("torch", "triton", "transformers", "datasets", "pyarrow", "fsspec", "tokenizers", "safetensors",
            "accelerate", "dill", "multiprocess", "pyyaml", "numpy", "flash-attn", "liger-kernel", "cut-cross-entropy")
NEEDED = ("torch", "triton", "transformers", "datasets", "yaml", "msft_fast.kernels", "msft_fast.run")  # by the parts
OPTIONAL = ("pyarrow", "fsspec", "tokenizers", "safetensors", "accelerate", "flash_attn", "liger_kernel",
            "cut_cross_entropy")
GOALS = {"mfu": 0.45, "snapshot_restore_share": 0.02, "preflight_under": 0.9, "restore_s_per_gb": 1.0}
PART_FILES = {"throughput": "throughput.json", "loss_timing": "loss_timing.json", "trainer_check": "trainer_check.json",
              "variants": "variants.json", "rollout": "rollout.json", "train_vs_hf": "train_cuda.json"}


def try_import(name: str) -> dict:
    """{"ok": True}, or the error: its last traceback line and the frames nearest to it."""
    try:
        importlib.import_module(name)
        return {"ok": True}
    except Exception as e:  # noqa: BLE001 - any failure of an import is what this reports
        frames = traceback.format_exception(type(e), e, e.__traceback__)
        return {"ok": False, "error": frames[-1].strip(), "traceback_tail": "".join(frames[-4:]).splitlines()[-12:]}


def machine(mode: str) -> dict:
    def version(package):
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return "not installed"

    m = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "cores": os.cpu_count(),
         "cpu": "?", "versions": {p: version(p) for p in PACKAGES}, "driver": "-", "cuda": False,
         "gpu": "none (CPU dry run)" if mode == "cpu" else "none", "host_memory_gib_for_preflight": os.environ.get(
             "MSFT_FAST_HOST_MEMORY_GIB")}
    try:
        m["cpu"] = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
        m["host_memory_gib"] = int(open("/proc/meminfo").readline().split()[1]) / 2**20
        m["git_commit"] = os.environ.get("GIT_COMMIT") or subprocess.run(  # the device's copy has no .git
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or "?"
        import torch

        m["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            m.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, cuda=True)
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            m["driver"] = out[0] if out else "?"
    except Exception as e:  # noqa: BLE001 - what is known so far is kept; imports.json says what broke
        m["machine_error"] = f"{type(e).__name__}: {e}"[:200]
    return m


def setup(a) -> int:
    imports = {name: try_import(name) for name in NEEDED + OPTIONAL}
    m = machine(a.mode)
    write(os.path.join(a.work, "machine.json"), m)
    write(os.path.join(a.out, "imports.json"), {"date": m["date"], "python": sys.executable, "sys_path": sys.path,
                                                "imports": imports})
    print(f"{m['gpu']}, driver {m['driver']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    failed = {n: r for n, r in imports.items() if not r["ok"]}
    for name, r in failed.items():  # the traceback only when something inside the package broke
        plain = r["error"] == f"ModuleNotFoundError: No module named '{name}'"
        print(f"import {name} failed: {r['error']}" + ("" if plain else "\n    " + "\n    ".join(r["traceback_tail"])))
    # The parts run anyway: each fails at once with its own import error, recorded as its status.
    why = "; ".join([f"{n}: {failed[n]['error']}" for n in NEEDED if n in failed]
                    + ([] if m["cuda"] or a.mode == "cpu" else ["no CUDA device visible to torch"]))
    print(f"not ready: {why}" if why else "every needed import works")
    return 1 if why else 0


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write(path: str, content) -> None:
    """Written whole or not at all: a kill between two parts never leaves half a file to fetch."""
    text = content if isinstance(content, str) else json.dumps(content, indent=2, default=str)
    with open(path + ".tmp", "w") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(path + ".tmp", path)


def collect(work: str, out: str, mode: str, budget: int, wall: int, final: bool) -> dict:
    status = os.path.join(work, "status.jsonl")
    imports = (load(os.path.join(out, "imports.json")) or {}).get("imports", {})
    try:  # bench_loss.py --check prints one "ok " or "FAIL" line per case
        cases = [x.rstrip() for x in open(os.path.join(work, "loss_check.log")) if x.startswith(("ok ", "FAIL"))]
        failed = [x for x in cases if x.startswith("FAIL")]
        loss_check = {"cases": len(cases), "ok": len(cases) - len(failed), "failed": failed[:10]}
    except OSError:
        loss_check = None
    r = {"what": "bench/gpu_check.sh: the trainer's and the loss's CUDA paths on one GPU, in priority order" + (
        " (CPU dry run: tiny shapes; the figures mean nothing, the code paths ran)" if mode == "cpu" else ""),
         "mode": mode, "budget_seconds": budget, "wall_seconds": wall, "finished": final,
         "machine": load(os.path.join(work, "machine.json")) or {"versions": {}},
         "failed_imports": {n: x["error"] for n, x in imports.items() if not x.get("ok")},
         "parts": [json.loads(x) for x in open(status)] if os.path.exists(status) else [], "loss_check": loss_check,
         **{key: load(os.path.join(work, "parts", name)) for key, name in PART_FILES.items()}}
    r["goals"] = goals(r)
    return r


def runs(r: dict) -> list[dict]:
    """Every training variant that ran: the throughput part's and the other variants'."""
    return [x for key in ("throughput", "variants") for x in (r[key] or {}).get("results", [])]


def goals(r: dict) -> dict:
    """What the issues ask of a GPU run, met or not (None: not measured, or a CPU dry run)."""
    cuda, ok = r["mode"] == "gpu", [x for x in runs(r) if x.get("status") == "ok"]
    best = max(ok, key=lambda x: x.get("mfu") or 0, default=None)
    ro = (r["rollout"] or {}).get("rollout") or {}
    share = (ro.get("share_of_training") or {}).get("total")
    checks = (r["trainer_check"] or {}).get("checks") or {}
    per_gb = (checks.get("snapshot") or {}).get("restore_seconds_per_gb")
    ratios = {x["variant"]: (x.get("memory") or {}).get("estimate_over_peak") for x in ok}
    ratios.update(trainer_check=(checks.get("memory") or {}).get("estimate_over_peak"),
                  msft_rollout=(ro.get("memory") or {}).get("estimate_over_peak"))
    ratios = {k: v for k, v in ratios.items() if v is not None}
    syncs = checks.get("host_syncs") or {}

    def met(value, test):
        return test(value) if cuda and value is not None else None

    return {"mfu_at_least_45pct": {"best": best and best["variant"], "mfu": best and best.get("mfu"),
                                   "met": met(best and best.get("mfu"), lambda x: x >= GOALS["mfu"])},
            "snapshot_restore_under_2pct": {"share": share,
                                            "met": met(share, lambda x: x < GOALS["snapshot_restore_share"])},
            "restore_under_1s_per_gb": {"restore_seconds_per_gb": per_gb,
                                        "met": met(per_gb, lambda x: x < GOALS["restore_s_per_gb"])},
            "preflight_not_under_by_10pct": {"estimate_over_peak": ratios, "met": met(ratios or None, lambda x: all(
                v >= GOALS["preflight_under"] for v in x.values()))},
            "one_host_sync_per_step": {"per_step": syncs.get("per_step"), "total": syncs.get("total_per_step"),
                                       "met": met(syncs.get("goal_one_per_step"), bool)},
            "within_budget": {"wall": r["wall_seconds"], "budget": r["budget_seconds"],
                              "met": r["wall_seconds"] <= r["budget_seconds"]}}


def _fmt(x, spec=".2f", scale=1.0, suffix="") -> str:
    return "-" if x is None else f"{x * scale:{spec}}{suffix}"


def headline(r: dict, p: dict) -> str:
    """The figure a reader wants from a finished part, else its status detail."""
    name = p["part"]
    if p["status"] != "ok":
        return p["detail"]
    if name == "loss_check" and r["loss_check"]:
        return f"{r['loss_check']['ok']}/{r['loss_check']['cases']} cases match the float64 reference"
    if name in ("train_throughput", "train_variants"):
        done = (r["throughput" if name == "train_throughput" else "variants"] or {}).get("results", [])
        ok = [x for x in done if x["status"] == "ok"]
        best = max(ok, key=lambda x: x["tokens_per_s"], default=None)
        return f"{len(ok)}/{len(done)} variants ran" + (
            f"; fastest {best['variant']} {best['tokens_per_s']:.0f} tokens/s, MFU "
            f"{_fmt(best['mfu'], '.1f', 100, '%')}, peak {_fmt(best['peak_mem_gib'])} GiB" if best else "")
    if name == "loss_timing" and r["loss_timing"]:
        return ", ".join(f"{k} {v:.2f}" for k, v in r["loss_timing"]["shapes"][0]["ratios"].items()
                         if k.startswith(("time_over", "memory_over")))
    if name == "trainer_check" and r["trainer_check"]:
        c = r["trainer_check"]["checks"].get("snapshot")
        return (f"restore bitwise {c['bitwise_restore']}, {c['restore_seconds_per_gb']:.3f} s/GB; " if c else "") + \
            f"failed: {'; '.join(r['trainer_check']['failed']) or 'none'}"
    if name == "msft_rollout" and (r["rollout"] or {}).get("rollout", {}).get("share_of_training"):
        return f"snapshots + restores {100 * r['rollout']['rollout']['share_of_training']['total']:.2f}% of training"
    return p["detail"]  # the part's own table follows


def markdown(r: dict, parts_dir: str | None = None) -> list[str]:
    m = r["machine"]
    v = m.get("versions", {})
    lines = [f"# GPU check: {m.get('gpu', '?')}" + (f", driver {m.get('driver')}" if r["mode"] == "gpu" else "")
             + f" ({m.get('date', '?')}, commit {m.get('git_commit', '?')})", "",
             ", ".join(f"{p} {v[p]}" for p in PACKAGES if p in v) + f"; CUDA {m.get('torch_cuda')}; Python "
             f"{m.get('python')}, {m.get('cores')} cores ({m.get('cpu')}). Wall {r['wall_seconds']} s of a "
             f"{r['budget_seconds']} s budget" + (
                 "." if r["finished"] else "; **partial**: the check was still running when this was written."), ""]
    if r["mode"] == "cpu":
        lines += ["**CPU dry run**: tiny shapes, the same scripts and code paths; no figure below is a GPU "
                  "measurement.", ""]
    if r["failed_imports"]:
        lines += ["Imports that failed (imports.json has their tracebacks):", ""]
        lines += [f"- {n}: {e}" for n, e in r["failed_imports"].items()] + [""]
    lines += ["| part | status | s | result |", "|---|---|---|---|"]
    lines += [f"| {p['part']} | {p['status']} | {'' if p.get('seconds') is None else p['seconds']} | {headline(r, p)} |"
              for p in r["parts"]]
    for key in ("throughput", "loss_timing", "trainer_check", "variants", "rollout", "train_vs_hf"):
        md = os.path.join(parts_dir or "", PART_FILES[key][:-4] + "md")
        if parts_dir and os.path.exists(md):  # each part's own table, under the part's name
            lines += ["", f"## {key}"] + open(md).read().splitlines()[1:]
    lines += ["", "Goals" + (" (judged on a GPU only)" if r["mode"] == "cpu" else "") + ":", ""]
    return lines + [f"- {name.replace('_', ' ')}: {({True: 'met', False: 'NOT met', None: '-'})[g['met']]} "
                    f"({json.dumps({k: x for k, x in g.items() if k != 'met'}, default=str)[:300]})"
                    for name, g in r["goals"].items()]


def render(a) -> int:
    r = collect(a.work, a.out, a.mode, a.budget, a.wall, a.final)
    write(os.path.join(a.out, "gpu_check_logs.txt"), "".join(
        f"===== {os.path.basename(path)} (last 60 lines)\n" + "".join(open(path, errors="replace").readlines()[-60:])
        for path in sorted(glob.glob(os.path.join(a.work, "*.log")), key=os.path.getmtime)))
    write_outputs(a.out, "gpu_check", r, markdown(r, os.path.join(a.work, "parts")), quiet=not a.final)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("setup", "render"))
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--work", required=True, help="the check's scratch folder: status, logs, parts/")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--wall", type=int, default=0)
    p.add_argument("--final", action="store_true", help="the last render: the check finished")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    return setup(a) if a.step == "setup" else render(a)


if __name__ == "__main__":
    sys.exit(main())
