"""The last step of bench/gpu_check.sh: one JSON and one markdown table of everything the parts wrote,
with the machine (GPU name, driver, CUDA, versions of torch, triton and the carried packages), and
the tail of every part's log in one text file. Three files in --out, so the device tool (which
returns at most 8) brings all of them back.

    python bench/gpu_check_report.py --mode gpu --work WORKDIR --out OUTDIR --budget 470 --wall 431
"""
from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import time

PACKAGES = ("torch", "triton", "transformers", "datasets", "tokenizers", "safetensors", "accelerate", "flash-attn",
            "liger-kernel", "cut-cross-entropy", "numpy", "pyarrow")
GOALS = {"mfu": 0.45, "snapshot_restore_share": 0.02, "preflight_under": 0.9}


def version(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "not available"


def machine() -> dict:
    import torch

    m = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "platform": platform.platform(),
         "cores": os.cpu_count(), "torch_cuda": torch.version.cuda,
         "versions": {p: version(p) for p in PACKAGES}}
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        m["cpu"] = platform.processor() or "?"
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
        m["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            m["driver"] = out[0] if out else "?"
        except (OSError, subprocess.TimeoutExpired):
            m["driver"] = "? (no nvidia-smi)"
    else:
        m["gpu"], m["driver"] = "none (CPU dry run)", "-"
    return m


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def loss_check(log_path: str) -> dict | None:
    """bench_loss.py --check prints one 'ok ' or 'FAIL' line per case."""
    try:
        lines = open(log_path).read().splitlines()
    except OSError:
        return None
    ok = sum(line.startswith("ok ") for line in lines)
    failed = [line for line in lines if line.startswith("FAIL")]
    return {"cases": ok + len(failed), "ok": ok, "failed": failed[:10]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--work", required=True, help="the check's work folder: status, logs, parts/")
    p.add_argument("--status", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--wall", type=int, required=True)
    a = p.parse_args()
    dev = "cuda" if a.mode == "gpu" else "cpu"
    parts_dir = os.path.join(a.work, "parts")
    parts = [json.loads(line) for line in open(a.status)]
    report = {
        "what": "bench/gpu_check.sh: the trainer's CUDA paths on one GPU" + (" (CPU dry run: tiny shapes; the figures "
                                                                            "mean nothing, the code paths ran)"
                                                                            if a.mode == "cpu" else ""),
        "mode": a.mode, "budget_seconds": a.budget, "wall_seconds": a.wall, "machine": machine(),
        "install": open(os.path.join(a.work, "install.txt")).read().splitlines()
        if os.path.exists(os.path.join(a.work, "install.txt")) else [],
        "parts": parts,
        "loss_check": loss_check(os.path.join(a.work, "loss_check.log")),
        "trainer_check": load(os.path.join(parts_dir, "trainer_check.json")),
        "throughput": load(os.path.join(parts_dir, f"step_train_{dev}.json")),
        "rollout": load(os.path.join(parts_dir, f"msft_rollout_{dev}.json")),
    }
    report["goals"] = goals(report)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    lines = markdown(report)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "gpu_check_logs.txt"), "w") as f:
        for path in sorted(glob.glob(os.path.join(a.work, "*.log")), key=os.path.getmtime):
            f.write(f"===== {os.path.basename(path)} (last 60 lines)\n")
            f.writelines(open(path, errors="replace").readlines()[-60:])
    print("\n".join(lines))


def variants(report: dict) -> list[dict]:
    t = report["throughput"]
    return [r for r in (t or {}).get("results", []) if r.get("status") == "ok"]


def goals(report: dict) -> dict:
    """What the issue asks of a GPU run, met or not (None: not measured)."""
    cuda = report["mode"] == "gpu"
    g: dict = {}
    ok = variants(report)
    best = max(ok, key=lambda r: r["mfu"] or 0, default=None)
    g["mfu_at_least_45pct"] = {"best": best and best["variant"], "mfu": best and best.get("mfu"),
                               "met": (best["mfu"] >= GOALS["mfu"]) if cuda and best and best.get("mfu") else None}
    ro = (report["rollout"] or {}).get("rollout") or {}
    share = (ro.get("share_of_training") or {}).get("total")
    g["snapshot_restore_under_2pct"] = {"share": share, "met": share < GOALS["snapshot_restore_share"]
                                        if cuda and share is not None else None}
    ratios = {r["variant"]: (r.get("memory") or {}).get("estimate_over_peak") for r in ok}
    tc = report["trainer_check"] or {}
    mem = (tc.get("checks") or {}).get("memory") or {}
    ratios["trainer_check"] = mem.get("estimate_over_peak")
    ratios["msft_rollout"] = (ro.get("memory") or {}).get("estimate_over_peak")
    ratios = {k: v for k, v in ratios.items() if v is not None}
    g["preflight_not_under_by_10pct"] = {"estimate_over_peak": ratios,
                                         "met": all(v >= GOALS["preflight_under"] for v in ratios.values())
                                         if cuda and ratios else None}
    syncs = (tc.get("checks") or {}).get("host_syncs") or {}
    g["one_host_sync_per_step"] = {"per_step": syncs.get("per_step"), "total": syncs.get("total_per_step"),
                                   "met": syncs.get("goal_one_per_step") if cuda else None}
    g["within_budget"] = {"wall": report["wall_seconds"], "budget": report["budget_seconds"],
                          "met": report["wall_seconds"] <= report["budget_seconds"]}
    return g


def _fmt(x, spec=".2f", scale=1.0, suffix="") -> str:
    return "-" if x is None else f"{x * scale:{spec}}{suffix}"


def markdown(r: dict) -> list[str]:
    m, v = r["machine"], r["machine"]["versions"]
    head = (f"# GPU check: {m['gpu']}" + (f", driver {m['driver']}" if r["mode"] == "gpu" else "")
            + f" ({m['date']})")
    lines = [head, "",
             f"torch {v['torch']} (CUDA {m['torch_cuda']}), triton {v['triton']}, transformers {v['transformers']}, "
             f"datasets {v['datasets']}, flash-attn {v['flash-attn']}, liger-kernel {v['liger-kernel']}, "
             f"cut-cross-entropy {v['cut-cross-entropy']}; Python {m['python']}, {m['cores']} cores ({m['cpu']}). "
             f"Wall {r['wall_seconds']} s of a {r['budget_seconds']} s budget.", ""]
    if r["mode"] == "cpu":
        lines += ["**CPU dry run**: tiny shapes, the same scripts and code paths; no figure below is a GPU "
                  "measurement.", ""]
    lines += ["| part | status | s | result |", "|---|---|---|---|"]
    for p in r["parts"]:
        lines.append(f"| {p['part']} | {p['status']} | {p.get('seconds') if p.get('seconds') is not None else ''} | "
                     f"{part_figure(r, p)} |")
    ok = variants(r)
    if r["throughput"]:
        lines += ["", "Throughput (`msft-fast train`, sft, one rank; first steps not timed):", "",
                  "| variant | status | tokens/s | MFU | peak GiB | preflight GiB | preflight / peak | "
                  "data / fwd+bwd / optimizer |", "|---|---|---|---|---|---|---|---|"]
        for x in r["throughput"]["results"]:
            if x["status"] != "ok":
                lines.append(f"| {x['variant']} | {x['status']}: {x['why']} | | | | | | |")
                continue
            mem = x.get("memory") or {}
            split = " / ".join(f"{100 * x['time_share'][k]:.0f}%" for k in ("data", "fwd_bwd", "optimizer"))
            lines.append(f"| {x['variant']} | ok | {x['tokens_per_s']:.0f} | {_fmt(x.get('mfu'), '.1f', 100, '%')} | "
                         f"{_fmt(x.get('peak_mem_gib'))} | {_fmt(mem.get('preflight_gib'))} | "
                         f"{_fmt(mem.get('estimate_over_peak'))} | {split} |")
    tc = (r["trainer_check"] or {}).get("checks") or {}
    if tc:
        lines += ["", "Trainer check (Llama-3.2-1B shape, train.grad_accum=2):", ""]
        for name, c in tc.items():
            lines.append(f"- {name}: {c.get('summary', '')}")
        sites = (tc.get("host_syncs") or {}).get("by_site") or {}
        if sites:
            steps = tc["host_syncs"]["steps"]
            lines.append("- host syncs by call site (per step): "
                         + "; ".join(f"{_short(k)} {n / steps:g}" for k, n in list(sites.items())[:6]))
        failed = (r["trainer_check"] or {}).get("failed") or []
        lines.append("- failed checks: " + ("; ".join(failed) if failed else "none"))
    ro = (r["rollout"] or {}).get("rollout")
    if ro and ro.get("status") == "ok":
        sh = ro["share_of_training"]
        lines += ["", f"mSFT roll-out (2 tasks, {ro['evaluations']} evaluations, {ro['rollbacks']} roll-back, "
                      f"{ro['steps']} steps, {(ro['snapshot_bytes_per_state'] or 0) / 1e9:.2f} GB per state): "
                      f"captures {_fmt(sh['snapshot_host'], '.2f', 100, '%')} host + "
                      f"{_fmt(sh['capture_overlap'], '.2f', 100, '%')} overlap, restores "
                      f"{_fmt(sh['restore'], '.2f', 100, '%')}: **{_fmt(sh['total'], '.2f', 100, '%')}** of "
                      f"{ro['train_seconds']:.1f} s of training."]
    lines += ["", "Goals" + (" (judged on a GPU only)" if r["mode"] == "cpu" else "") + ":", ""]
    for name, g in r["goals"].items():
        met = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        detail = {k: val for k, val in g.items() if k != "met"}
        lines.append(f"- {name.replace('_', ' ')}: {met} ({json.dumps(detail, default=str)[:300]})")
    if not ok and r["mode"] == "gpu":
        lines.append("- no throughput variant finished")
    return lines


def _short(path: str) -> str:
    return re.sub(r"^.*/(site-packages|msft_fast|kernels|bench)/", r"\1/", path)


def part_figure(r: dict, p: dict) -> str:
    if p["status"] != "ok":
        return p["detail"]
    name = p["part"]
    if name == "loss_check" and r["loss_check"]:
        lc = r["loss_check"]
        return f"{lc['ok']}/{lc['cases']} cases match the float64 reference"
    if name == "trainer_check" and r["trainer_check"]:
        c = r["trainer_check"]["checks"]
        return (f"reductions {c['grad_reductions']['summary'].split(' (')[0]}; syncs {c['host_syncs']['summary']}; "
                f"restore bitwise {c['snapshot']['bitwise_restore']}, {c['snapshot']['restore_seconds_per_gb']:.3f} s/GB; "
                f"preflight/peak {_fmt(c['memory'].get('estimate_over_peak'))}")
    if name == "train_throughput" and r["throughput"]:
        ok = variants(r)
        best = max(ok, key=lambda x: x["tokens_per_s"], default=None)
        n = len(r["throughput"]["results"])
        return (f"{len(ok)}/{n} variants ran" + (f"; fastest {best['variant']} {best['tokens_per_s']:.0f} tokens/s"
                                                 + (f", MFU {100 * best['mfu']:.1f}%" if best.get("mfu") else "")
                                                 if best else ""))
    if name == "msft_rollout" and r["rollout"]:
        ro = r["rollout"]["rollout"]
        if ro.get("status") == "ok":
            return f"snapshots + restores {100 * ro['share_of_training']['total']:.2f}% of training time"
        return f"{ro.get('status')}: {ro.get('why')}"
    return p["detail"]


if __name__ == "__main__":
    main()
