"""Every bench/ entry runs in its quick or dry mode and writes the JSON fields that bench/README.md,
gpu_check_report.py and the docs read; every command in bench/README.md parses. Speed is never
asserted here."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_bench(script: str, tmp_path, *args: str, timeout: int = 300) -> None:
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), "--workdir", str(tmp_path / "work"),
                          "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]


def load(tmp_path, name: str) -> dict:
    with open(tmp_path / "out" / name) as f:
        return json.load(f)


def readme_commands() -> list[str]:
    """Every `python bench/...` and `bash bench/...` command quoted in bench/README.md."""
    with open(os.path.join(BENCH, "README.md")) as f:
        return re.findall(r"`((?:python|bash) bench/[^`]+)`", f.read())


def test_every_command_in_the_bench_readme_parses():
    """Each Python command parses its arguments (run with --help appended: a bad value stops argparse
    before the help) and names only options its script has; each shell script passes bash -n."""
    commands = readme_commands()
    scripts = {c.split()[1] for c in commands}
    assert {"bench/gpu_check.sh", "bench/bench_loss.py", "bench/bench_train.py", "bench/bench_methods.py",
            "bench/roofline.py", "bench/kernels_sm90.py", "bench/attention_check.py"} <= scripts
    root = os.path.dirname(BENCH)
    for command in commands:
        words = command.split()
        if words[0] == "bash":
            out = subprocess.run(["bash", "-n", os.path.join(root, words[1])], capture_output=True, text=True)
            assert out.returncode == 0, (command, out.stderr)
            continue
        out = subprocess.run([sys.executable, os.path.join(root, words[1]), *words[2:], "--help"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
        assert out.returncode == 0, (command, out.stderr[-2000:])
        for option in (w for w in words[2:] if w.startswith("--")):
            assert option in out.stdout, (command, option)
    for script in ("gpu_check.sh", "gather_wheels.sh"):
        out = subprocess.run(["bash", "-n", os.path.join(BENCH, script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_bench_methods_quick(tmp_path):
    """The budget comparison on a tiny mixture: four runs, exact match beside the loss, each mSFT run
    judged against the SFT runs, and each run's time split from the trainer's clocks."""
    run_bench("bench_methods.py", tmp_path, "--quick", "msft.report_exact_match=true", timeout=600)
    r = load(tmp_path, "budget_cpu_quick.json")
    assert [x["label"] for x in r["runs"]] == ["sft_1ep", "sft_2ep", "msft_C0.5", "msft_C0.5_p1"]
    for x in r["runs"]:
        assert set(x["tasks"]) == {"copy", "upper", "reverse"} and x["discarded_flops"] <= x["train_flops"]
        assert 0 <= x["pooled_val_exact_match"] <= 1 and x["generated_tokens"] > 0  # beside the loss
        assert all(0 <= t["val_exact_match"] <= 1 for t in x["tasks"].values())
        # The trainer's clocks (steps, evaluations, captures, restores) lie inside the method's wall time.
        sec = x["seconds"]
        assert sec["train"] > 0 and sec["eval"] > 0 and 0 <= sec["rest"] < x["method_seconds"], sec
        assert sec["snapshot"] > 0 and sec["restore"] > 0  # mSFT's roll-backs; SFT keeps its best evaluation
    sft = {x["label"]: x for x in r["runs"] if x["method"] == "sft"}
    assert sft["sft_2ep"]["train_flops"] == pytest.approx(2 * sft["sft_1ep"]["train_flops"], rel=0.05)
    assert set(r["comparison"]["all"]["msft"]) == {"msft_C0.5", "msft_C0.5_p1"}
    md = (tmp_path / "out" / "budget_cpu_quick.md").read_text()
    assert "| run | pooled val_loss | pooled exact match | copy | upper | reverse |" in md
    assert "| msft_C0.5 | " in md.split("Where each run's method time went")[1]


@pytest.mark.slow
def test_bench_loss_quick(tmp_path):
    run_bench("bench_loss.py", tmp_path, "--quick")
    r = load(tmp_path, "loss_cpu_quick.json")
    assert {"date", "machine", "setup", "shapes", "what"} <= r.keys()
    assert {"cores", "cpu", "torch"} <= r["machine"].keys()
    (shape,) = r["shapes"]
    assert set(shape["results"]) == {"msft_fast", "msft_fast_no_tasks", "materialised"}
    for x in shape["results"].values():
        assert x["seconds"] > 0 and x["extra_peak_mb"] is not None
    losses = [x["loss"] for x in shape["results"].values()]  # the same summed loss on the same inputs
    assert max(losses) == pytest.approx(min(losses), rel=1e-4)
    assert {"time_over_materialised", "memory_over_materialised", "tasks_time_cost"} <= shape["ratios"].keys()
    assert shape["skipped"] == {"cce_torch_compile": "cut_cross_entropy is not installed"}


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    """Ours vs HF Trainer padded and padding-free, all three sides run (accelerate is pinned in
    requirements/dev-cpu.txt) on the very same documents."""
    run_bench("bench_train.py", tmp_path, "--quick")
    r = load(tmp_path, "train_cpu_quick.json")
    assert r["threads"] == 1 and r["repeats"] == 1
    st = r["settings"]["quick"]
    ours, hf, flat = (st["results"][k] for k in ("ours", "hf", "hf_flat"))
    assert ours["status"] == "ok" and ours["train_tokens_per_s"] > 0 and ours["peak_mem_gib"] > 0
    # One CPU process in fp32: auto picks the bucketed packed attention and leaves FSDP2 out.
    assert ours["attn_implementation"] == "packed_sdpa" and ours["fsdp2"] is False
    assert ours["memory"]["peak_kind"] == "max RSS" and ours["memory"]["preflight_gib"] > 0
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
        assert len(x["tokens_per_s_per_round"]) == 1
    md = (tmp_path / "out" / "train_cpu_quick.md").read_text()
    assert "HF Trainer, padding-free" in md and "OMP_NUM_THREADS=1" in md


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
    assert default["attn_implementation"] == "packed_sdpa" and default["tokens_per_s"] > 0 and default["mfu"] is None
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


