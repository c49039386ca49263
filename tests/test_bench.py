"""The benchmark scripts run (their --quick / --cpu dry modes) and write the JSON fields that
bench/README.md, gpu_check.sh and the README tables read. Speed itself is never asserted here."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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
    # The bench times each part around the trainer's calls; the trainer clocks the same work inside
    # them (history.json of the run): the outside figure is never less, and only a little more (a
    # train_step writes its metrics.jsonl line outside its own clock: about 2 ms, against about
    # 12 ms for its data and optimizer parts, which a clock of forward/backward alone would miss).
    with open(tmp_path / "work" / "runs" / "bench_msft" / "history.json") as f:
        history = json.load(f)
    totals, calls = history["totals"], run["calls"]
    restores = sum(1 for s in history["stages"] if s["excluded"]) + 1  # each roll-back, then final
    assert (calls["train_steps"], calls["eval_passes"], calls["restore"]) == \
        (totals["steps"], len(history["evals"]), restores)
    for outside, inside, n in ((run["train_step_seconds"], totals["train_seconds"], totals["steps"]),
                               (run["eval_pass_seconds"], totals["eval_seconds"], len(history["evals"])),
                               (run["snapshot_seconds"], totals["snapshot_seconds"], run["snapshots"]),
                               (run["restore_seconds"], totals["restore_seconds"], restores)):
        assert inside <= outside + 1e-6 and outside <= 1.03 * inside + 0.004 * n, (outside, inside, n)
    # Bookkeeping is what the method's wall time holds besides those parts, and its named parts
    # are within it: neither can be negative unless some time was counted twice.
    assert 0 <= run["bookkeeping_seconds"] < run["method_wall_seconds"] <= totals["wall_seconds"]
    assert min(run["bookkeeping_parts_seconds"].values()) >= 0, run["bookkeeping_parts_seconds"]
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
    # about 30 s of CPU; the wall-clock limit leaves room for a loaded machine
    run_bench("bench_budget.py", tmp_path, "--quick", "msft.report_exact_match=true", timeout=600)
    r = load(tmp_path, "budget_cpu_quick.json")
    labels = [x["label"] for x in r["runs"]]
    assert labels == ["sft_1ep", "sft_2ep", "msft_C0.5", "msft_C0.5_p1"]
    for x in r["runs"]:
        assert {"pooled_metric", "pooled_val_loss", "tasks", "train_flops", "discarded_flops", "eval_flops"} <= x.keys()
        assert set(x["tasks"]) == {"copy", "upper", "reverse"}
        assert x["discarded_flops"] <= x["train_flops"]
        assert 0 <= x["pooled_val_exact_match"] <= 1 and x["generated_tokens"] > 0  # beside the loss
        assert all(0 <= t["val_exact_match"] <= 1 for t in x["tasks"].values())
    md = (tmp_path / "out" / "budget_cpu_quick.md").read_text()
    assert "| run | pooled val_loss | pooled exact match | copy | upper | reverse |" in md
    sft = {x["label"]: x for x in r["runs"] if x["method"] == "sft"}
    assert sft["sft_2ep"]["train_flops"] == pytest.approx(2 * sft["sft_1ep"]["train_flops"], rel=0.05)
    assert set(r["comparison"]["msft"]) == {"msft_C0.5", "msft_C0.5_p1"}
    assert (tmp_path / "out" / "budget_cpu_quick.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_generate_quick(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_generate.py"), "--quick", "--nproc", "1",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = load(tmp_path, "generate_cpu_quick.json")
    (run,) = r["runs"]
    assert run["world_size"] == 1 and run["generated_tokens"] > 0 and run["gather_seconds"] > 0
    assert set(run["modes"]) == {"plain", "once", "per_forward"}
    assert all(m["tokens_per_s"] > 0 for m in run["modes"].values()) and run["modes"]["plain"]["vs_plain"] == 1


GPU_CHECK_PARTS = ["setup", "train_throughput", "loss_timing", "trainer_check", "loss_check", "train_variants",
                   "msft_rollout"]


def gpu_check_env(tmp_path, **extra) -> dict:
    return {**os.environ, "OUT": str(tmp_path / "out"), "BENCH_WORK": str(tmp_path / "work"),
            "PEER_WHEELS": str(tmp_path / "none"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part_in_priority_order(tmp_path):
    """bench/gpu_check.sh --cpu: every part's Python on tiny shapes, in the GPU run's order, nothing
    skipped; missing packages reported with their import error; four files in $OUT (the device tool
    brings back at most 8)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--cpu"], capture_output=True, text=True,
                          env=gpu_check_env(tmp_path), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.txt", "imports.json"]
    r = json.loads((out / "gpu_check.json").read_text())
    assert [p["part"] for p in r["parts"]] == GPU_CHECK_PARTS
    assert all(p["status"] == "ok" for p in r["parts"]), r["parts"]
    assert r["mode"] == "cpu" and r["finished"] and r["wall_seconds"] <= r["budget_seconds"]
    m = r["machine"]
    assert {"gpu", "driver", "torch_cuda", "cores", "cpu", "date", "git_commit", "host_memory_gib"} <= m.keys()
    for package in ("torch", "triton", "pyarrow", "fsspec", "transformers", "datasets"):
        assert m["versions"][package][0].isdigit(), (package, m["versions"][package])
    assert m["versions"]["flash-attn"] == "not installed"
    # A missing package is reported with the import's own error, not a bare "not available".
    imports = json.loads((out / "imports.json").read_text())["imports"]
    assert imports["datasets"]["ok"] and imports["msft_fast.run"]["ok"]
    assert imports["flash_attn"]["error"] == "ModuleNotFoundError: No module named 'flash_attn'"
    assert r["failed_imports"]["flash_attn"] == imports["flash_attn"]["error"]

    (default,) = r["throughput"]["results"]  # the default attention, eager: what the CPU runs is packed SDPA
    assert default["status"] == "ok" and default["variant"] == "auto_compile_off"
    assert default["attn_used"] == "packed_sdpa" and default["tokens_per_s"] > 0 and default["mfu"] is None
    assert default["memory"]["preflight_gib"] > 0 and set(default["time_share"]) == {"data", "fwd_bwd", "optimizer"}
    (shape,) = r["loss_timing"]["shapes"]
    assert set(shape["results"]) == {"msft_fast_chunked", "materialised"}
    assert all(x["grad_error"]["grad_hidden"] < 1e-2 for x in shape["results"].values())
    tc = r["trainer_check"]
    assert tc["failed"] == [] and list(tc["checks"]) == ["snapshot", "host_syncs", "grad_reductions", "time_split",
                                                         "memory"]
    c = tc["checks"]
    snap = c["snapshot"]
    assert snap["bitwise_restore"] and snap["adam_state_included"] and snap["gb_per_state"] > 0
    red = c["grad_reductions"]
    assert red["unit_reductions_per_step"] == [red["fsdp_units"]] * len(red["unit_reductions_per_step"])
    assert max(red["micro_batches_per_step"]) == 2  # train.grad_accum=2, reduced once
    assert c["host_syncs"]["per_step"]["trainer reduction read"] == 1
    assert c["memory"]["preflight_gib"] > 0 and c["memory"]["peak_kind"] == "max RSS"
    assert r["loss_check"]["cases"] > 0 and r["loss_check"]["ok"] == r["loss_check"]["cases"]
    by = {x["variant"]: x for x in r["variants"]["results"]}
    assert by["packed_sdpa_compile_off_ac_selective"]["status"] == "ok"
    assert by["packed_sdpa_compile_off_ac_selective"]["activation_checkpointing"] == "selective"
    assert by["flash_attention_2_compile_off"]["status"] == "not available"
    assert by["flex_attention_compile_off"]["status"] == "not available"  # no FlexAttention backward on a CPU
    ro = r["rollout"]["rollout"]
    assert ro["status"] == "ok" and ro["rollbacks"] == 1 and ro["restore_seconds"] > 0 and ro["snapshot_seconds"] > 0
    assert set(ro["share_of_training"]) == {"snapshot_host", "capture_overlap", "restore", "total"}
    assert all(g["met"] is None for k, g in r["goals"].items() if k != "within_budget")  # judged on a GPU only
    md = (out / "gpu_check.md").read_text()
    assert "CPU dry run" in md and "| trainer_check | ok |" in md and "partial" not in md


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid`: `timeout` puts each part in a process group of its own."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == sid:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass  # gone already


@pytest.mark.slow
def test_gpu_check_killed_midway_keeps_the_parts_that_finished(tmp_path):
    """A device call that runs out of time is killed wherever it is: the JSON, rewritten after every
    part, still holds each part that finished, and the markdown says the run was cut short."""
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", os.path.join(BENCH, "gpu_check.sh"), "--cpu"], env=gpu_check_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    finished = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                finished = json.loads((out / "gpu_check.json").read_text())["parts"]
            except (OSError, ValueError):
                pass  # not written yet
            if len(finished) >= 2:  # setup and the first measuring part
                break
            time.sleep(0.5)
    finally:
        kill_session(proc.pid)  # the whole call, as the device tool ends it: the shell, the part, the trainer
        proc.wait()
    assert [p["part"] for p in finished] == GPU_CHECK_PARTS[:2], finished
    r = json.loads((out / "gpu_check.json").read_text())
    assert [(p["part"], p["status"]) for p in r["parts"][:2]] == [("setup", "ok"), ("train_throughput", "ok")]
    assert not r["finished"] and r["throughput"]["results"][0]["tokens_per_s"] > 0
    assert r["machine"]["versions"]["torch"] and "**partial**" in (out / "gpu_check.md").read_text()


def test_gpu_check_skips_what_the_budget_cannot_fit(tmp_path):
    """Parts that would get less than PART_MIN seconds are recorded as skipped, never started with a
    limit of zero or less (`timeout 0` means no limit at all)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--cpu"], capture_output=True, text=True,
                          env=gpu_check_env(tmp_path, BUDGET_S="20"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    r = json.loads((out / "gpu_check.json").read_text())
    assert [p["part"] for p in r["parts"]] == GPU_CHECK_PARTS and r["finished"]
    for p in r["parts"][1:]:
        assert p["status"] == "skipped" and p["detail"].startswith("out of time"), p
    assert "limit" not in proc.stdout  # no part was started


@pytest.mark.slow
def test_bench_ce_quick(tmp_path):
    run_bench("bench_ce.py", tmp_path, "--quick")
    r = load(tmp_path, "ce_cpu_quick.json")
    assert {"date", "machine", "setup", "shapes", "what"} <= r.keys()
    assert {"cores", "cpu", "torch"} <= r["machine"].keys()
    (shape,) = r["shapes"]
    assert set(shape["results"]) == {"msft_fast", "msft_fast_no_tasks", "materialised"}
    for x in shape["results"].values():
        assert x["seconds"] > 0 and x["extra_peak_mb"] is not None
    # The three compute the same summed loss on the same inputs.
    losses = [x["loss"] for x in shape["results"].values()]
    assert max(losses) == pytest.approx(min(losses), rel=1e-4)
    assert {"time_over_materialised", "memory_over_materialised", "tasks_time_cost"} <= shape["ratios"].keys()


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    """Ours vs HF Trainer padded and padding-free, all three sides run (accelerate is pinned in
    requirements/dev-cpu.txt) on the very same documents."""
    run_bench("bench_train.py", tmp_path, "--quick", timeout=300)
    r = load(tmp_path, "train_cpu_quick.json")
    assert r["machine"]["accelerate_for_hf"] and r["threads"] == 1
    st = r["settings"]["quick"]
    ours, hf, flat = (st["results"][k] for k in ("msft_fast", "hf_trainer", "hf_trainer_flat"))
    assert ours["status"] == "ok" and ours["train_tokens_per_s"] > 0 and ours["peak_mem_gib"] > 0
    assert ours["memory_kind"] == "max RSS"
    # One CPU process in fp32: auto picks the bucketed packed attention and leaves FSDP2 out.
    assert ours["attn_implementation"] == "packed_sdpa" and ours["fsdp2"] is False
    assert hf["status"] == "ok", hf
    assert flat["status"] == "ok", flat
    assert hf["collator"] == "DataCollatorForSeq2Seq" and flat["collator"] == "DataCollatorWithFlattening"
    assert hf["useful_tokens"] == flat["useful_tokens"] == ours["useful_tokens"]  # the same documents, once each
    assert hf["padded_tokens"] > hf["useful_tokens"] and flat["padded_tokens"] == flat["useful_tokens"]
    # Same batches, same seed: padding-free only if HF kept the flattened documents apart (position ids).
    assert flat["final_loss"] == pytest.approx(hf["final_loss"], rel=1e-4)
    for key in ("over_hf_padded", "over_hf_flat"):
        x = st["ratios"][key]
        assert x["same_useful_tokens"] and x["tokens_per_s"] > 0 and x["peak_memory"] > 0
        assert len(x["tokens_per_s_per_round"]) == r["repeats"] == 1
    assert r["ratios"]["quick over_hf_flat tokens_per_s"] == st["ratios"]["over_hf_flat"]["tokens_per_s"]
    md = (tmp_path / "out" / "train_cpu_quick.md").read_text()
    assert "HF Trainer, padding-free" in md and "OMP_NUM_THREADS=1" in md


def test_bench_packed_attention_quick(tmp_path):
    run_bench("bench_packed_attention.py", tmp_path, "--quick")
    r = load(tmp_path, "packed_attention_cpu_quick.json")
    assert r["threads"] == 1 and r["rows"]
    for row in r["rows"].values():
        st = row["strategies"]
        assert set(st) == {"dense_mask", "pow2", "exact", "planned"}
        assert all(e["layer_fwd_bwd_ms"] > 0 for e in st.values())
        assert st["exact"]["padding"] == 0 and st["exact"]["attention_area_over_exact"] == 1
        assert st["exact"]["buckets"] >= st["planned"]["buckets"] >= 1
        assert max(st["pow2"]["bucket_lengths"]) >= row["max_len"]
    cost = r["cost_model"]
    assert cost["in_use"]["BUCKET_OVERHEAD"] > 0 and len(cost["points"]) > 3
    assert (tmp_path / "out" / "packed_attention_cpu_quick.md").exists()


def test_packed_attention_cost_line_says_when_the_fit_is_undefined():
    """A noisy --quick fit can give b <= 0 (ratios None): the report says so instead of failing."""
    sys.path.insert(0, BENCH)
    try:
        from bench_packed_attention import cost_model_line
    finally:
        sys.path.remove(BENCH)
    model = {"points": [{}] * 6, "c0_s": 1e-4, "a_s_per_token_channel": 2e-9, "b_s_per_score_channel": -1e-12,
             "median_abs_relative_error": 0.3, "bucket_overhead_scores": None, "token_cost_scores": None}
    assert "c0/b = undefined (fitted b <= 0) and a/b = undefined (fitted b <= 0)" in cost_model_line(model)
    model.update(b_s_per_score_channel=1e-11, bucket_overhead_scores=1e7, token_cost_scores=200.0)
    assert "c0/b = 1e+07 and a/b = 200" in cost_model_line(model)


def test_gpu_check_scripts_parse():
    for script in ("gpu_check.sh", "gather_wheels.sh"):
        out = subprocess.run(["bash", "-n", os.path.join(BENCH, script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
