"""bench/gpu_check.sh's Python side, in two steps:

    python bench/gpu_check_report.py setup  --mode gpu --work WORK --out OUT
    python bench/gpu_check_report.py render --mode gpu --work WORK --out OUT --budget 300 --wall 120 [--final]

setup (once, after the carried wheels are installed): the machine (GPU, driver, CUDA, host memory), the
versions of the packages the check depends on, and an import of every module it uses, each failure kept
with the last line of its traceback (OUT/imports.json: "datasets: ImportError: ... pyarrow ..." rather
than a bare "not available"); WORK/machine.json; WORK/available.sh, which tells the shell which parts
can run and, if not, why. Exit 1 when a module a part needs does not import.

render (after every part): whatever the parts wrote so far, as OUT/gpu_check.json, gpu_check.md and
gpu_check_logs.txt (the tail of every part's log), each written whole (a copy renamed into place), so a
call killed at any moment returns readable files. It reads JSON only: no torch import, well under a second.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata as md
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback

PACKAGES = ("torch", "triton", "transformers", "datasets", "pyarrow", "fsspec", "tokenizers", "safetensors",
            "accelerate", "dill", "multiprocess", "pyyaml", "numpy", "flash-attn", "liger-kernel", "cut-cross-entropy")
# Which imports each kind of part needs (the optional peers are reported, never required).
NEEDS = {"LOSS": ("torch", "triton", "msft_fast.kernels"),
         "TRAIN": ("torch", "transformers", "datasets", "yaml", "msft_fast.run"),
         "HF": ("torch", "transformers", "datasets", "yaml", "msft_fast.run", "accelerate")}
OPTIONAL = ("pyarrow", "fsspec", "tokenizers", "safetensors", "flash_attn", "liger_kernel", "cut_cross_entropy")
GOALS = {"mfu": 0.45, "snapshot_restore_share": 0.02, "preflight_under": 0.9, "restore_s_per_gb": 1.0}
PART_FILES = {"throughput": "throughput.json", "loss_timing": "loss_timing.json",
              "trainer_check": "trainer_check.json", "variants": "variants.json", "rollout": "rollout.json",
              "train_vs_hf": "train_cuda.json"}


# ---------------------------------------------------------------------------------------------
# setup


def version(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "not installed"


def try_import(name: str) -> dict:
    """{"ok": True} or the error: its last traceback line and the frames nearest to it."""
    try:
        importlib.import_module(name)
        return {"ok": True}
    except Exception as e:  # noqa: BLE001 - any failure of an import is what this reports
        frames = traceback.format_exception(type(e), e, e.__traceback__)
        return {"ok": False, "error": traceback.format_exception_only(type(e), e)[-1].strip(),
                "traceback_tail": "".join(frames[-4:]).splitlines()[-12:]}


def machine(mode: str) -> dict:
    m = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
         "platform": platform.platform(), "cores": os.cpu_count(), "cpu": "?",
         "versions": {p: version(p) for p in PACKAGES}}
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            m["host_memory_gib"] = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    m["host_memory_gib_for_preflight"] = os.environ.get("MSFT_FAST_HOST_MEMORY_GIB")
    try:  # the device gets a copy of the tree without .git: the caller passes GIT_COMMIT there
        m["git_commit"] = os.environ.get("GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        m["git_commit"] = "?"
    m["gpu"], m["driver"], m["cuda"] = "none (CPU dry run)" if mode == "cpu" else "none", "-", False
    try:
        import torch

        m["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            m.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, cuda=True)
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            m["driver"] = out[0] if out else "?"
    except Exception as e:  # noqa: BLE001 - the imports table says what is wrong with torch
        m["gpu"] = f"unknown ({type(e).__name__}: {e})"[:200]
    return m


def setup(a) -> int:
    names = list(dict.fromkeys([n for group in NEEDS.values() for n in group] + list(OPTIONAL)))
    imports = {name: try_import(name) for name in names}
    m = machine(a.mode)
    _write_json(os.path.join(a.work, "machine.json"), m)
    _write_json(os.path.join(a.out, "imports.json"), {"date": m["date"], "python": sys.executable,
                                                      "sys_path": sys.path, "imports": imports})
    print(f"{m['gpu']}, driver {m['driver']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    failed = {n: r for n, r in imports.items() if not r["ok"]}
    for name, r in failed.items():  # the traceback only when something inside the package broke
        plain = r["error"] == f"ModuleNotFoundError: No module named '{name}'"
        print(f"import {name} failed: {r['error']}" + ("" if plain else "\n    " + "\n    ".join(r["traceback_tail"])))
    lines, missing = [], False
    for group, needs in NEEDS.items():
        why = "; ".join(f"{n}: {failed[n]['error']}" for n in needs if n in failed)
        if group != "HF":  # HF Trainer is a peer: without accelerate that part alone does not run
            missing |= bool(why)
        if group == "LOSS" and a.mode == "gpu" and not m["cuda"]:
            why = why or "no CUDA device visible to torch (torch.cuda.is_available() is False)"
        if group in ("TRAIN", "HF") and a.mode == "gpu" and not m["cuda"]:
            why = why or "no CUDA device visible to torch"
        lines += [f"{group}_OK={0 if why else 1}", f"{group}_WHY={shlex.quote(why[:300])}"]
    setup_why = "; ".join(f"{n}: {r['error']}" for n, r in failed.items() if n not in OPTIONAL)
    lines.append(f"SETUP_WHY={shlex.quote(setup_why[:300])}")
    with open(os.path.join(a.work, "available.sh"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 1 if missing else 0


# ---------------------------------------------------------------------------------------------
# render


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    _write(path, json.dumps(obj, indent=2, default=str))


def _write(path: str, text: str) -> None:
    """Written whole or not at all: a kill between two parts never leaves half a file to fetch."""
    with open(path + ".tmp", "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(path + ".tmp", path)


def loss_check(log_path: str) -> dict | None:
    """bench_loss.py --check prints one 'ok ' or 'FAIL' line per case."""
    try:
        lines = open(log_path).read().splitlines()
    except OSError:
        return None
    ok = sum(line.startswith("ok ") for line in lines)
    failed = [line for line in lines if line.startswith("FAIL")]
    return {"cases": ok + len(failed), "ok": ok, "failed": failed[:10]}


def collect(work: str, out: str, mode: str, budget: int, wall: int, final: bool) -> dict:
    status = os.path.join(work, "status.jsonl")
    parts = [json.loads(line) for line in open(status)] if os.path.exists(status) else []
    imports = (load(os.path.join(out, "imports.json")) or {}).get("imports", {})
    dry = " (CPU dry run: tiny shapes; the figures mean nothing, the code paths ran)" if mode == "cpu" else ""
    r = {"what": "bench/gpu_check.sh: the trainer's and the loss's CUDA paths on one GPU, in priority order" + dry,
         "mode": mode, "budget_seconds": budget, "wall_seconds": wall, "finished": final,
         "machine": load(os.path.join(work, "machine.json")) or {"versions": {}},
         "failed_imports": {n: x["error"] for n, x in imports.items() if not x.get("ok")},
         "install": open(os.path.join(work, "install.txt")).read().splitlines()
         if os.path.exists(os.path.join(work, "install.txt")) else [],
         "parts": parts, "loss_check": loss_check(os.path.join(work, "loss_check.log"))}
    for key, name in PART_FILES.items():
        r[key] = load(os.path.join(work, "parts", name))
    r["goals"] = goals(r)
    return r


def render(a) -> int:
    r = collect(a.work, a.out, a.mode, a.budget, a.wall, a.final)
    lines = markdown(r)
    _write_json(os.path.join(a.out, "gpu_check.json"), r)
    _write(os.path.join(a.out, "gpu_check.md"), "\n".join(lines))
    logs = []
    for path in sorted(glob.glob(os.path.join(a.work, "*.log")), key=os.path.getmtime):
        logs.append(f"===== {os.path.basename(path)} (last 60 lines)\n")
        logs.extend(open(path, errors="replace").readlines()[-60:])
    _write(os.path.join(a.out, "gpu_check_logs.txt"), "".join(logs))
    if a.final:
        print("\n".join(lines))
    return 0


def runs(r: dict) -> list[dict]:
    """Every training variant that ran: the throughput part's and the other variants'."""
    return [x for key in ("throughput", "variants") for x in (r[key] or {}).get("results", [])]


def goals(r: dict) -> dict:
    """What the issues ask of a GPU run, met or not (None: not measured, or a CPU dry run)."""
    cuda = r["mode"] == "gpu"
    ok = [x for x in runs(r) if x.get("status") == "ok"]
    best = max(ok, key=lambda x: x.get("mfu") or 0, default=None)
    g = {"mfu_at_least_45pct": {"best": best and best["variant"], "mfu": best and best.get("mfu"),
                                "met": best["mfu"] >= GOALS["mfu"] if cuda and best and best.get("mfu") else None}}
    ro = (r["rollout"] or {}).get("rollout") or {}
    share = (ro.get("share_of_training") or {}).get("total")
    g["snapshot_restore_under_2pct"] = {"share": share, "met": share < GOALS["snapshot_restore_share"]
                                        if cuda and share is not None else None}
    checks = (r["trainer_check"] or {}).get("checks") or {}
    per_gb = (checks.get("snapshot") or {}).get("restore_seconds_per_gb")
    g["restore_under_1s_per_gb"] = {"restore_seconds_per_gb": per_gb,
                                    "met": per_gb < GOALS["restore_s_per_gb"] if cuda and per_gb is not None else None}
    ratios = {x["variant"]: (x.get("memory") or {}).get("estimate_over_peak") for x in ok}
    ratios["trainer_check"] = (checks.get("memory") or {}).get("estimate_over_peak")
    ratios["msft_rollout"] = (ro.get("memory") or {}).get("estimate_over_peak")
    ratios = {k: v for k, v in ratios.items() if v is not None}
    g["preflight_not_under_by_10pct"] = {"estimate_over_peak": ratios, "met": all(
        v >= GOALS["preflight_under"] for v in ratios.values()) if cuda and ratios else None}
    syncs = checks.get("host_syncs") or {}
    g["one_host_sync_per_step"] = {"per_step": syncs.get("per_step"), "total": syncs.get("total_per_step"),
                                   "met": syncs.get("goal_one_per_step") if cuda else None}
    g["within_budget"] = {"wall": r["wall_seconds"], "budget": r["budget_seconds"],
                          "met": r["wall_seconds"] <= r["budget_seconds"]}
    return g


def _fmt(x, spec=".2f", scale=1.0, suffix="") -> str:
    return "-" if x is None else f"{x * scale:{spec}}{suffix}"


def markdown(r: dict) -> list[str]:
    m = r["machine"]
    v = m.get("versions", {})
    lines = [f"# GPU check: {m.get('gpu', '?')}" + (f", driver {m.get('driver')}" if r["mode"] == "gpu" else "")
             + f" ({m.get('date', '?')}, commit {m.get('git_commit', '?')})", "",
             ", ".join(f"{p} {v.get(p, '?')}" for p in PACKAGES if p in v)
             + f"; CUDA {m.get('torch_cuda')}; Python {m.get('python')}, {m.get('cores')} cores ({m.get('cpu')}). "
             f"Wall {r['wall_seconds']} s of a {r['budget_seconds']} s budget"
             + ("." if r["finished"] else "; **partial**: the check was still running when this was written."), ""]
    if r["mode"] == "cpu":
        lines += ["**CPU dry run**: tiny shapes, the same scripts and code paths; no figure below is a GPU "
                  "measurement.", ""]
    if r["failed_imports"]:
        lines += ["Imports that failed (OUT/imports.json has their tracebacks):", ""]
        lines += [f"- {n}: {e}" for n, e in r["failed_imports"].items()] + [""]
    lines += ["| part | status | s | result |", "|---|---|---|---|"]
    for p in r["parts"]:
        seconds = "" if p.get("seconds") is None else p["seconds"]
        lines.append(f"| {p['part']} | {p['status']} | {seconds} | {part_figure(r, p)} |")
    lines += throughput_table(r) + loss_timing_table(r) + trainer_lines(r) + rollout_lines(r) + vs_hf_lines(r)
    lines += ["", "Goals" + (" (judged on a GPU only)" if r["mode"] == "cpu" else "") + ":", ""]
    for name, g in r["goals"].items():
        met = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        detail = {k: val for k, val in g.items() if k != "met"}
        lines.append(f"- {name.replace('_', ' ')}: {met} ({json.dumps(detail, default=str)[:300]})")
    return lines


def throughput_table(r: dict) -> list[str]:
    if not runs(r):
        return []
    lines = ["", "Training (`msft-fast train`, sft, one rank; the first steps not timed):", "",
             "| variant | attention used | status | tokens/s | MFU | peak GiB | preflight GiB | preflight / peak | "
             "data / fwd+bwd / optimizer |", "|---|---|---|---|---|---|---|---|---|"]
    for x in runs(r):
        if x["status"] != "ok":
            lines.append(f"| {x['variant']} | | {x['status']}: {x['why']} | | | | | | |")
            continue
        mem = x.get("memory") or {}
        split = " / ".join(f"{100 * x['time_share'][k]:.0f}%" for k in ("data", "fwd_bwd", "optimizer"))
        lines.append(f"| {x['variant']} | {x.get('attn_used', x.get('attn'))} | ok | {x['tokens_per_s']:.0f} | "
                     f"{_fmt(x.get('mfu'), '.1f', 100, '%')} | {_fmt(x.get('peak_mem_gib'))} | "
                     f"{_fmt(mem.get('preflight_gib'))} | {_fmt(mem.get('estimate_over_peak'))} | {split} |")
    return lines


def loss_timing_table(r: dict) -> list[str]:
    shapes = (r["loss_timing"] or {}).get("shapes") or []
    lines = []
    for s in shapes:
        unit, scale = ("ms", 1e3) if r["mode"] == "gpu" else ("s", 1.0)
        lines += ["", f"Loss, forward + backward, {s['tokens']} x {s['hidden']} x {s['vocab']} {s['dtype']}:", "",
                  f"| path | {unit} | extra peak MB | error vs float64 (loss / dH / dW) |", "|---|---|---|---|"]
        for case, x in s["results"].items():
            e = x.get("grad_error")
            err = "-" if not e else f"{e['loss']:.0e} / {e['grad_hidden']:.0e} / {e['grad_weight']:.0e}"
            lines.append(f"| {case} | {x['seconds'] * scale:.3g} | {_fmt(x.get('extra_peak_mb'), '.0f')} | {err} |")
        lines += [f"| {case} | {why} | | |" for case, why in s.get("skipped", {}).items()]
    return lines


def trainer_lines(r: dict) -> list[str]:
    tc = r["trainer_check"] or {}
    if not tc.get("checks"):
        return []
    lines = ["", "Trainer check (Llama-3.2-1B shape, train.grad_accum=2):", ""]
    lines += [f"- {name}: {c.get('summary', '')}" for name, c in tc["checks"].items()]
    sites = (tc["checks"].get("host_syncs") or {}).get("by_site") or {}
    if sites:
        steps = tc["checks"]["host_syncs"]["steps"]
        lines.append("- host syncs by call site (per step): "
                     + "; ".join(f"{_short(k)} {n / steps:g}" for k, n in list(sites.items())[:6]))
    return lines + ["- failed checks: " + ("; ".join(tc.get("failed") or []) or "none")]


def rollout_lines(r: dict) -> list[str]:
    ro = (r["rollout"] or {}).get("rollout")
    if not ro or ro.get("status") != "ok":
        return []
    sh = ro["share_of_training"]
    return ["", f"mSFT roll-out (2 tasks, {ro['evaluations']} evaluations, {ro['rollbacks']} roll-back, "
                f"{ro['steps']} steps, {(ro['snapshot_bytes_per_state'] or 0) / 1e9:.2f} GB per state): captures "
                f"{_fmt(sh['snapshot_host'], '.2f', 100, '%')} host + {_fmt(sh['capture_overlap'], '.2f', 100, '%')} "
                f"overlap, restores {_fmt(sh['restore'], '.2f', 100, '%')}: **{_fmt(sh['total'], '.2f', 100, '%')}** "
                f"of {ro['train_seconds']:.1f} s of training."]


def vs_hf_lines(r: dict) -> list[str]:
    settings = (r["train_vs_hf"] or {}).get("settings") or {}
    lines = []
    for name, st in settings.items():
        x = st["ratios"].get("over_hf_flat") or {}
        lines += ["", f"msft-fast train vs HF Trainer ({name}): "
                  + (f"tokens/s {x['tokens_per_s']:.2f}x, peak memory {x['peak_memory']:.2f}x" if x else
                     "no ratio: " + "; ".join(f"{k} {v.get('status')}: {v.get('why', '')}"
                                              for k, v in st["results"].items() if v.get("status") != "ok"))]
    return lines


def _short(path: str) -> str:
    return re.sub(r"^.*/(site-packages|msft_fast|kernels|bench)/", r"\1/", path)


def part_figure(r: dict, p: dict) -> str:
    """The one figure a reader wants from a finished part, else its status detail."""
    name = p["part"]
    if p["status"] != "ok":
        return p["detail"]
    if name == "loss_check" and r["loss_check"]:
        lc = r["loss_check"]
        return f"{lc['ok']}/{lc['cases']} cases match the float64 reference"
    if name in ("train_throughput", "train_variants"):
        done = (r["throughput" if name == "train_throughput" else "variants"] or {}).get("results", [])
        ok = [x for x in done if x["status"] == "ok"]
        best = max(ok, key=lambda x: x["tokens_per_s"], default=None)
        return f"{len(ok)}/{len(done)} variants ran" + (
            f"; fastest {best['variant']} {best['tokens_per_s']:.0f} tokens/s"
            + (f", MFU {100 * best['mfu']:.1f}%" if best.get("mfu") else "")
            + f", peak {_fmt(best.get('peak_mem_gib'))} GiB" if best else "")
    if name == "loss_timing" and r["loss_timing"]:
        s = r["loss_timing"]["shapes"][0]
        return ", ".join(f"{k} {v:.2f}" for k, v in s["ratios"].items() if k.startswith(("time_over", "memory_over")))
    if name == "trainer_check" and r["trainer_check"]:
        c = r["trainer_check"]["checks"].get("snapshot")
        return (f"restore bitwise {c['bitwise_restore']}, {c['restore_seconds_per_gb']:.3f} s/GB; " if c else "") + \
            f"failed: {'; '.join(r['trainer_check']['failed']) or 'none'}"
    if name == "msft_rollout" and r["rollout"]:
        ro = r["rollout"]["rollout"]
        if ro.get("status") == "ok":
            return f"snapshots + restores {100 * ro['share_of_training']['total']:.2f}% of training time"
        return f"{ro.get('status')}: {ro.get('why')}"
    return p["detail"]


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
