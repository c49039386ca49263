"""The benchmark scripts run (their --quick / --cpu dry modes) and write the JSON fields that
bench/README.md, gpu_check.sh and the README tables read. Speed itself is never asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_bench(script: str, tmp_path, *args: str, timeout: int = 120) -> None:
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), "--workdir", str(tmp_path / "work"),
                          "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]


def load(tmp_path, name: str) -> dict:
    with open(tmp_path / "out" / name) as f:
        return json.load(f)


@pytest.mark.slow
def test_bench_msft_quick(tmp_path):
    run_bench("bench_msft.py", tmp_path, "--quick")
    r = load(tmp_path, "msft_overhead_cpu_quick.json")
    assert {"date", "machine", "setup", "end_to_end", "synthetic_pool", "goal"} <= r.keys()
    assert {"cores", "cpu", "torch", "device"} <= r["machine"].keys()
    e = r["end_to_end"]
    o = e["overhead_pct_of_training"]
    assert {"snapshot", "restore", "bookkeeping", "all_but_evaluation",
            "all_but_evaluation_and_report_write"} <= o.keys()
    assert o["snapshot"] >= 0 and o["restore"] >= 0
    run = e["msft_runs"][0]
    assert run["snapshots"] > 0 and run["snapshot_bytes"] > 0
    # The parts add up to the method's wall time.
    total = run["train_step_seconds"] + run["eval_pass_seconds"] + run["snapshot_seconds"] + run["restore_seconds"]
    assert total + run["bookkeeping_seconds"] == pytest.approx(run["method_wall_seconds"])
    # The plain run trained at least mSFT's tokens, and no more than one step beyond them.
    plain = e["plain_runs"][0]
    assert run["trained_tokens"] <= plain["trained_tokens"] <= run["trained_tokens"] + 256
    assert 0 < e["evaluation"]["flops_share_of_training"] < 1
    s = r["synthetic_pool"]
    # fp32 weights + exp_avg + exp_avg_sq, and one scalar `step` per parameter tensor.
    assert s["bytes_per_snapshot"] == pytest.approx(3 * 4 * s["params"], rel=1e-4)
    assert s["restore_seconds_per_gb"] > 0 and s["capture_seconds_per_gb"] > 0
    assert (tmp_path / "out" / "msft_overhead_cpu_quick.md").exists()


@pytest.mark.slow
def test_bench_budget_quick(tmp_path):
    run_bench("bench_budget.py", tmp_path, "--quick")
    r = load(tmp_path, "budget_cpu_quick.json")
    labels = [x["label"] for x in r["runs"]]
    assert labels == ["sft_1ep", "sft_2ep", "msft_C0.5", "msft_C0.5_p1"]
    for x in r["runs"]:
        assert {"pooled_metric", "pooled_val_loss", "tasks", "train_flops", "discarded_flops", "eval_flops"} <= x.keys()
        assert set(x["tasks"]) == {"copy", "upper", "reverse"}
        assert x["discarded_flops"] <= x["train_flops"]
    sft = {x["label"]: x for x in r["runs"] if x["method"] == "sft"}
    assert sft["sft_2ep"]["train_flops"] == pytest.approx(2 * sft["sft_1ep"]["train_flops"], rel=0.05)
    assert set(r["comparison"]["msft"]) == {"msft_C0.5", "msft_C0.5_p1"}
    assert (tmp_path / "out" / "budget_cpu_quick.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_train_gpu_cpu_dry_run(tmp_path):
    run_bench("bench_train_gpu.py", tmp_path, "--cpu", "--attn", "sdpa", "flash_attention_2", "--compile", "off")
    r = load(tmp_path, "step_train_cpu.json")
    by = {x["variant"]: x for x in r["results"]}
    ok = by["sdpa_compile_off"]
    assert ok["status"] == "ok" and ok["tokens_per_s"] > 0 and ok["mfu"] is None  # no peak known for a CPU
    assert by["flash_attention_2_compile_off"]["status"] == "not available"
