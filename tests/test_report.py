"""Reports from history.json: curves.png, report.md, compare(), and the `report`/`compare` commands.

Histories are synthetic (no training): an SFT run, an mSFT run with two exclusions and roll-backs,
and a run still in progress.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from msft_fast.errors import OutputError, UserError
from msft_fast.report import compare, format_flops, load_history, write_report

TF = 1e12


def _eval(eval_id, step, epoch, stage, tf, ef, losses, active, accs=None, extra=None):
    tasks = {}
    for t, loss in losses.items():
        tasks[t] = {"val_loss": loss, "val_token_acc": (accs or {}).get(t, 0.5), "val_tokens": 100,
                    "active": t in active, **((extra or {}).get(t, {}))}
    pooled = sum(losses.values()) / len(losses)
    return {"eval_id": eval_id, "step": step, "epoch": epoch, "stage": stage, "train_flops": tf,
            "eval_flops": ef, "pooled_val_loss": pooled, "tasks": tasks}


def sft_history():
    evals = [_eval(i, 10 * i, 0.5 * i, 0, i * TF, i * 1e10, {"a": 2.0 - 0.1 * i, "b": 3.0 - 0.2 * i},
                   {"a", "b"}) for i in range(5)]
    return {"format_version": 1, "status": "finished", "method": "sft", "tasks": ["a", "b"],
            "evals": evals, "stages": [{"stage": 0, "excluded": None, "rollback_to_eval": None}],
            "final": {"eval_id": 4, "pooled_val_loss": evals[4]["pooled_val_loss"]},
            "totals": {"train_flops": 4 * TF, "eval_flops": 5e10, "trained_tokens": 1000, "wall_seconds": 50.0,
                       "train_seconds": 40.0, "eval_seconds": 5.0}}


# mSFT: stage 0 excludes a (peak at eval 2, evals 3-4 discarded), stage 1 excludes b (peak at eval 6,
# evals 7-8 discarded), stage 2 runs to its end. Each stage starts by evaluating the restored state.
# train_flops counts all compute spent; step and epoch belong to the state (they go back on roll-back).
_MSFT_ROWS = [
    # id, step, epoch, stage, train TF, losses a, b, c, active
    (0, 0, 0.0, 0, 0, (2.0, 3.0, 4.0), "abc"),
    (1, 10, 0.5, 0, 1, (1.5, 2.5, 3.5), "abc"),
    (2, 20, 1.0, 0, 2, (1.2, 2.2, 3.2), "abc"),
    (3, 30, 1.5, 0, 3, (1.4, 2.0, 3.0), "abc"),
    (4, 40, 2.0, 0, 4, (1.6, 1.9, 2.9), "abc"),
    (5, 20, 1.0, 1, 4, (1.2, 2.2, 3.2), "bc"),
    (6, 30, 1.5, 1, 5, (1.3, 1.8, 2.8), "bc"),
    (7, 40, 2.0, 1, 6, (1.4, 1.9, 2.5), "bc"),
    (8, 50, 2.5, 1, 7, (1.5, 2.1, 2.3), "bc"),
    (9, 30, 1.5, 2, 7, (1.3, 1.8, 2.8), "c"),
    (10, 40, 2.0, 2, 8, (1.35, 1.85, 2.2), "c"),
    (11, 50, 2.5, 2, 9, (1.4, 1.9, 2.1), "c"),
]


def msft_history():
    evals = [_eval(i, step, ep, st, tf * TF, (i + 1) * 1e10, dict(zip("abc", ls)), set(act),
                   accs={"a": 0.6, "b": 0.7, "c": 0.8})
             for i, step, ep, st, tf, ls, act in _MSFT_ROWS]
    stages = [
        {"stage": 0, "excluded": "a", "rollback_to_eval": 2, "start_eval": 0, "end_eval": 4},  # numbers derived
        {"stage": 1, "excluded": "b", "rollback_to_eval": 6, "start_eval": 5, "end_eval": 8,
         "steps_kept": 10, "steps_discarded": 20, "train_flops": 3 * TF, "discarded_flops": 2 * TF},
        {"stage": 2, "excluded": None, "rollback_to_eval": None},
    ]
    return {"format_version": 1, "status": "finished", "method": "msft", "tasks": ["a", "b", "c"],
            "metric": "val_loss", "evals": evals, "stages": stages,
            "final": {"eval_id": 11, "pooled_val_loss": evals[11]["pooled_val_loss"]},
            "totals": {"train_flops": 9 * TF, "eval_flops": 1.2e11, "trained_tokens": 5000, "wall_seconds": 100.0,
                       "discarded_flops": 4 * TF, "train_seconds": 80.0, "eval_seconds": 10.0,
                       "snapshot_seconds": 2.0, "restore_seconds": 1.0}}


def running_history():
    h = msft_history()
    h["status"] = "running"
    h["evals"] = h["evals"][:7]  # stage 0 closed, stage 1 in progress (evals 5-6)
    h["stages"] = h["stages"][:1]
    h["final"] = None
    h["totals"] = None
    return h


def _write(tmp_path, name, history):
    d = tmp_path / name
    d.mkdir()
    (d / "history.json").write_text(json.dumps(history))
    return d


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _row(md, first_cell):
    rows = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_msft_report(tmp_path):
    d = _write(tmp_path, "msft_run", msft_history())
    png, md_path = write_report(str(d))
    assert png == os.path.join(str(d), "curves.png") and md_path == os.path.join(str(d), "report.md")
    assert _png_size(png) == (1400, 600)
    assert not [f for f in os.listdir(d) if f.startswith(".tmp-")]
    md = open(md_path, encoding="utf-8").read()
    assert "- method: msft" in md and "- tasks (3): a, b, c" in md
    assert "- final: eval 11 (stage 2, epoch 2.5, step 50): pooled val_loss 1.8000" in md
    # Without final_kept_train_flops the final model's share is derived: 9 TF spent, 4 TF rolled back
    # before the final state (eval 11, on the kept path).
    assert ("train 9.00 TFLOP: 5.00 TFLOP (55.6%) kept in the final model, 4.00 TFLOP (44.4%) discarded, "
            "of which 4.00 TFLOP rolled back by roll-backs") in md
    assert "eval 120 GFLOP" in md and "total 9.12 TFLOP" in md
    assert "100.0 s = train 80.0 s (80.0%) + eval 10.0 s (10.0%) + snapshot 2.0 s (2.0%)" in md
    assert "restore 1.0 s (1.0%) + other 7.0 s (7.0%)" in md
    # stage, excluded, peak epoch, rolled back to, steps kept, steps discarded, train FLOPs, discarded FLOPs
    assert _row(md, "0") == ["0", "a", "1", "2", "20", "20", "4.00 TFLOP", "2.00 TFLOP"]  # derived from evals
    assert _row(md, "1") == ["1", "b", "1.5", "6", "10", "20", "3.00 TFLOP", "2.00 TFLOP"]  # recorded fields
    assert _row(md, "2") == ["2", "none", "-", "-", "20", "0", "2.00 TFLOP", "0 FLOP"]
    # final per-task metrics at eval 11: task, active, excluded in stage, val_loss, val_token_acc, val_tokens
    assert "## Final per-task metrics (eval 11, epoch 2.5)" in md
    assert _row(md, "a") == ["a", "no", "0", "1.4000", "0.6000", "100"]
    assert _row(md, "b") == ["b", "no", "1", "1.9000", "0.7000", "100"]
    assert _row(md, "c") == ["c", "yes", "-", "2.1000", "0.8000", "100"]
    assert "4 of them on rolled-back (discarded) states" in md


def test_sft_report_and_rewrite(tmp_path):
    d = _write(tmp_path, "sft_run", sft_history())
    png, md_path = write_report(str(d))
    first = os.path.getmtime(md_path)
    assert _png_size(png) == (1400, 600)
    md = open(md_path, encoding="utf-8").read()
    assert "- method: sft" in md and "pooled val_loss 1.9000" in md
    assert _row(md, "0") == ["0", "none", "-", "-", "40", "0", "4.00 TFLOP", "0 FLOP"]
    write_report(str(d))  # regenerating replaces both files in place
    assert os.path.getmtime(md_path) >= first and _png_size(png) == (1400, 600)


def test_running_report(tmp_path):
    d = _write(tmp_path, "running_run", running_history())
    png, md_path = write_report(str(d))
    assert _png_size(png) == (1400, 600)
    md = open(md_path, encoding="utf-8").read()
    assert "- status: running (this report covers the 7 evaluations so far)" in md
    assert "- final: not chosen yet; best pooled val_loss so far 1.9667 at eval 6" in md
    assert "- compute: train 5.00 TFLOP so far (2.00 TFLOP of it rolled back by roll-backs, 40.0%)" in md
    assert "- wall time: -" in md
    assert _row(md, "0") == ["0", "a", "1", "2", "20", "20", "4.00 TFLOP", "2.00 TFLOP"]
    assert _row(md, "1 (in progress)") == ["1 (in progress)", "-", "-", "-", "10", "-", "1.00 TFLOP", "-"]
    assert "## Per-task metrics at the latest evaluation (eval 6, epoch 1.5)" in md


def test_custom_metric_and_minimal_history(tmp_path):
    h = sft_history()
    h["metric"], h["higher_is_better"] = "mymod:exact_match", True
    for e in h["evals"]:
        e["pooled_metric"] = 0.1 * e["eval_id"]
        for t in e["tasks"].values():
            t["metric"] = 0.1 * e["eval_id"]
    h["final"]["pooled_metric"] = 0.4
    d = _write(tmp_path, "custom", h)
    _, md_path = write_report(str(d))
    md = open(md_path, encoding="utf-8").read()
    assert "- metric: mymod:exact_match (higher is better)" in md
    assert "pooled mymod:exact_match 0.4000, pooled val_loss 1.9000" in md
    assert _row(md, "a")[-2] == "0.4000"  # the metric column
    # a history just created: no evaluation, no stage
    empty = _write(tmp_path, "empty", {"format_version": 1, "status": "running", "method": "msft",
                                        "tasks": ["a"], "evals": [], "stages": [], "final": None, "totals": None})
    png, md_path = write_report(str(empty))
    assert _png_size(png) == (1400, 600)
    assert "No evaluation yet." in open(md_path, encoding="utf-8").read()


def test_compare(tmp_path):
    dirs = [_write(tmp_path, "sft_run", sft_history()), _write(tmp_path, "msft_run", msft_history()),
            _write(tmp_path, "running_run", running_history())]
    table = compare([str(d) for d in dirs])
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "method", "final pooled val_loss", "a val_loss", "b val_loss", "c val_loss",
                      "train FLOPs", "kept in final", "discarded", "eval FLOPs", "total FLOPs", "wall s"]
    assert _row(table, "sft_run") == ["sft_run", "sft", "1.9000", "1.6000", "2.2000", "-", "4.00 TFLOP",
                                      "4.00 TFLOP", "0 FLOP", "50.0 GFLOP", "4.05 TFLOP", "50.0"]
    assert _row(table, "msft_run") == ["msft_run", "msft", "1.8000", "1.4000", "1.9000", "2.1000", "9.00 TFLOP",
                                       "5.00 TFLOP", "4.00 TFLOP (44.4%)", "120 GFLOP", "9.12 TFLOP", "100.0"]
    assert _row(table, "running_run") == ["running_run", "msft (running)", "-", "-", "-", "-", "-", "-", "-",
                                          "-", "-", "-"]


def test_exact_match_shows_beside_the_loss_whichever_metric_selects(tmp_path):
    """Runs that scored generated answers: report.md's per-task table and compare() show exact match
    next to the loss; a run that selected by it reads its curves and pooled values from its fields."""
    def with_answers(h, metric):
        h["metric"], h["higher_is_better"] = metric, metric != "val_loss"
        for e in h["evals"]:
            e["pooled_val_exact_match"] = 0.1 * e["eval_id"]
            for t in e["tasks"].values():
                t.update(val_exact_match=0.05 * e["eval_id"], val_answers=20)
                t["metric"] = t[metric]
            e["pooled_metric"] = e[f"pooled_{metric}"]
        final = h["evals"][h["final"]["eval_id"]]
        h["final"].update(pooled_val_exact_match=final["pooled_val_exact_match"], pooled_metric=final["pooled_metric"])
        return h

    by_loss = _write(tmp_path, "by_loss", with_answers(sft_history(), "val_loss"))
    by_match = _write(tmp_path, "by_match", with_answers(sft_history(), "val_exact_match"))
    md = open(write_report(str(by_match))[1], encoding="utf-8").read()
    assert "- metric: val_exact_match (higher is better)" in md
    assert "pooled val_exact_match 0.4000, pooled val_loss 1.9000" in md
    assert _row(md, "a")[5:7] == ["0.2000", "20"]  # val_exact_match, answers
    md = open(write_report(str(by_loss))[1], encoding="utf-8").read()
    assert "pooled val_loss 1.9000, pooled val_exact_match 0.4000" in md
    table = compare([str(by_loss), str(by_match), _write(tmp_path, "plain", sft_history())])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[:9] == ["run", "method", "final pooled metric", "pooled val_loss", "pooled val_exact_match",
                          "a val_loss", "b val_loss", "a exact match", "b exact match"]
    assert _row(table, "by_match")[2:9] == ["0.4000 (val_exact_match)", "1.9000", "0.4000", "1.6000", "2.2000",
                                           "0.2000", "0.2000"]
    assert _row(table, "plain")[3:9] == ["1.9000", "-", "1.6000", "2.2000", "-", "-"]


def test_missing_or_bad_history(tmp_path):
    with pytest.raises(OutputError, match="history.json does not exist"):
        load_history(str(tmp_path))
    assert issubclass(OutputError, UserError)
    (tmp_path / "history.json").write_text("{not json")
    with pytest.raises(OutputError, match="history.json is not valid JSON"):
        write_report(str(tmp_path))
    (tmp_path / "history.json").write_text("[]")
    with pytest.raises(OutputError, match="not an msft-fast history"):
        compare([str(tmp_path)])


def test_format_flops():
    assert format_flops(None) == "-"
    assert format_flops(0) == "0 FLOP"
    assert format_flops(1.234e15) == "1.23 PFLOP"
    assert format_flops(12.34e12) == "12.3 TFLOP"
    assert format_flops(999.4e12) == "999 TFLOP"
    assert format_flops(999.96e12) == "1.00 PFLOP"
    assert format_flops(5e9) == "5.00 GFLOP"


def test_cli(tmp_path, capsys):
    from msft_fast.cli import main

    a = _write(tmp_path, "msft_run", msft_history())
    b = _write(tmp_path, "sft_run", sft_history())
    assert main(["report", str(a)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [os.path.join(str(a), "curves.png"), os.path.join(str(a), "report.md")]
    assert all(os.path.isfile(p) for p in out)

    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 4 and "| msft_run | msft |" in out and "| sft_run | sft |" in out

    empty = tmp_path / "nothing"
    empty.mkdir()
    for argv in (["report", str(empty)], ["compare", str(a), str(empty)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("msft-fast: error: ") and "history.json" in err[0]
        assert captured.out == ""


def test_import_is_cheap():
    code = ("import sys, msft_fast.report; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'transformers', 'msft_fast.training.trainer') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stage_numbers_derived_without_restart_evals(tmp_path):
    """The layout where a stage resumes from the restored state without evaluating it again, and
    stage records carry no start/end or counts: all numbers come from the evaluations."""
    rows = [  # id, step, epoch, stage, train TF, losses a, b, active
        (0, 0, 0.0, 0, 0, (2.0, 3.0), "ab"), (1, 10, 0.5, 0, 1, (1.5, 2.5), "ab"),
        (2, 20, 1.0, 0, 2, (1.2, 2.2), "ab"), (3, 30, 1.5, 0, 3, (1.4, 2.0), "ab"),
        (4, 40, 2.0, 0, 4, (1.6, 1.9), "ab"), (5, 30, 1.5, 1, 5, (1.3, 1.9), "b"),
        (6, 40, 2.0, 1, 6, (1.4, 1.7), "b"), (7, 50, 2.5, 1, 7, (1.5, 1.8), "b"),
        (8, 50, 2.5, 2, 8, (1.5, 1.75), ""), (9, 60, 3.0, 2, 9, (1.6, 1.8), ""),
    ]
    evals = [_eval(i, step, ep, st, tf * TF, 1e9, dict(zip("ab", ls)), set(act))
             for i, step, ep, st, tf, ls, act in rows]
    h = {"format_version": 1, "status": "finished", "method": "msft", "tasks": ["a", "b"], "evals": evals,
         "stages": [{"stage": 0, "excluded": "a", "rollback_to_eval": 2},
                    {"stage": 1, "excluded": "b", "rollback_to_eval": 6},
                    {"stage": 2, "excluded": None, "rollback_to_eval": None}],
         "final": {"eval_id": 8, "pooled_val_loss": 1.625}, "totals": {"train_flops": 9 * TF, "eval_flops": 1e10,
                                                                       "trained_tokens": 1, "wall_seconds": 1.0}}
    d = _write(tmp_path, "derived", h)
    png, md_path = write_report(str(d))
    assert _png_size(png) == (1400, 600)
    md = open(md_path, encoding="utf-8").read()
    assert "3 of them on rolled-back (discarded) states" in md
    # The final state (eval 8, 8 TF spent, 3 TF of it rolled back) descends from 5 TF; the 1 TF after
    # it (eval 9) is discarded too, though no roll-back threw it away.
    assert ("train 9.00 TFLOP: 5.00 TFLOP (55.6%) kept in the final model, 4.00 TFLOP (44.4%) discarded, "
            "of which 3.00 TFLOP rolled back by roll-backs") in md
    assert _row(md, "0") == ["0", "a", "1", "2", "20", "20", "4.00 TFLOP", "2.00 TFLOP"]
    assert _row(md, "1") == ["1", "b", "2", "6", "20", "10", "3.00 TFLOP", "1.00 TFLOP"]
    assert _row(md, "2") == ["2", "none", "-", "-", "20", "0", "2.00 TFLOP", "0 FLOP"]
    assert _row(compare([str(d)]), "derived")[-5:-3] == ["5.00 TFLOP", "4.00 TFLOP (44.4%)"]  # kept, discarded


# ---------------------------------------------------------------------------------------------
# Compute: total, kept in the final model, discarded, alike in report.md, compare and the console


def test_compute_after_the_final_state_counts_as_discarded_everywhere(tmp_path):
    """The issue's run: 489 GFLOP trained, the final model from early on, 21 GFLOP rolled back.
    Every view must say that 47% of the training compute is not in the final model, not 4.3%."""
    from msft_fast.report import describe_compute

    h = msft_history()
    h["totals"].update(train_flops=489e9, discarded_flops=21e9, final_kept_train_flops=259e9, eval_flops=56e9,
                       epochs_trained=19.35)
    h["compute_bound"] = {"max_epochs": 8.0, "stop_reason": "max_epochs"}
    d = _write(tmp_path, "issue_run", h)
    want = "train 489 GFLOP: 259 GFLOP (53.0%) kept in the final model, 230 GFLOP (47.0%) discarded, " \
           "of which 21.0 GFLOP rolled back by roll-backs; eval 56.0 GFLOP; total 545 GFLOP"
    assert describe_compute(h) == want  # the run's last console line
    _, md_path = write_report(str(d))
    md = open(md_path, encoding="utf-8").read()
    assert f"- compute: {want}" in md
    assert ("- epochs trained over all stages (kept and discarded): 19.35 (bound: msft.max_epochs 8); the loop "
            "stopped because the compute bound msft.max_epochs was reached") in md
    row = _row(compare([str(d)]), "issue_run")
    assert row[-6:-3] == ["489 GFLOP", "259 GFLOP", "230 GFLOP (47.0%)"]


class _Axes:
    """Records what `_draw_curve` plots: (xs, ys, linestyle) per call."""

    def __init__(self):
        self.lines = []

    def plot(self, xs, ys, *args, **kw):
        self.lines.append((list(xs), list(ys), kw.get("ls", kw.get("linestyle", "-"))))


def sro_history(second_pass=True):
    """SRO: pass 1 (evals 0-4, epochs 0-2) on a and b; b peaked at epoch 1 in it. Pass 2 restarts from
    eval 0, excludes b at epoch 1 (evals 5-6), and a trains to the end (evals 7-8)."""
    rows = [(0, 0, 0.0, 0, 0, (3.0, 3.0), "ab"), (1, 10, 0.5, 0, 1, (2.5, 2.0), "ab"),
            (2, 20, 1.0, 0, 2, (2.0, 1.5), "ab"), (3, 30, 1.5, 0, 3, (1.8, 1.7), "ab"),
            (4, 40, 2.0, 0, 4, (1.6, 1.9), "ab")]
    stages = [{"stage": 0, "phase": "probe", "excluded": None, "rollback_to_eval": None, "start_eval": 0,
               "end_eval": 4, "peak_evals": {"a": 4, "b": 2}}]
    if second_pass:
        rows += [(5, 10, 0.5, 1, 5, (2.5, 2.0), "ab"), (6, 20, 1.0, 1, 6, (2.0, 1.5), "ab"),
                 (7, 25, 1.5, 2, 7, (1.7, 1.6), "a"), (8, 30, 2.0, 2, 8, (1.5, 1.7), "a")]
        stages += [{"stage": 1, "phase": "schedule", "excluded": "b", "rollback_to_eval": None, "start_eval": 0,
                    "end_eval": 6, "peak_evals": {"b": 2}},
                   {"stage": 2, "phase": "schedule", "excluded": None, "rollback_to_eval": None, "start_eval": 6,
                    "end_eval": 8, "peak_evals": {}}]
    evals = [_eval(i, step, ep, st, tf * TF, 1e9, dict(zip("ab", ls)), set(act))
             for i, step, ep, st, tf, ls, act in rows]
    final = 8 if second_pass else 4
    return {"format_version": 1, "status": "finished", "method": "sro", "tasks": ["a", "b"], "evals": evals,
            "stages": stages, "final": {"eval_id": final, "pooled_val_loss": evals[final]["pooled_val_loss"]},
            "totals": {"train_flops": (8 if second_pass else 4) * TF, "eval_flops": 1e10, "wall_seconds": 1.0},
            "sro": {"second_pass": second_pass, "summary": "pass 2 restarted" if second_pass else "pass 2 skipped"}}


def _epoch_lines(history, task):
    from msft_fast.report import _draw_curve, _Run

    run, ax = _Run(history), _Axes()
    _draw_curve(ax, run, lambda e: run.task_value(e, task), lambda e: run.active(e, task),
                lambda e: e["epoch"], lambda r, e: r["epoch"], "red", lw=1.0, marker_size=0)
    return ax.lines


def test_sro_passes_are_two_curves_never_joined(tmp_path):
    for task in ("a", "b"):
        lines = _epoch_lines(sro_history(), task)
        segments = [(line[2], (x0, x1)) for line in lines for x0, x1 in zip(line[0], line[0][1:])]
        # No line goes back in epoch: pass 1 ends at epoch 2, pass 2 starts again at 0.
        assert all(x1 >= x0 for _, (x0, x1) in segments), segments
        assert any(style == "-." for style, _ in segments)  # pass 1 is drawn as the probe
        probe = [line for line in lines if line[2] == "-."]
        assert [x for line in probe for x in line[0]] == [0.0, 0.5, 1.0, 1.5, 2.0]
    # Without a second pass the probe is the run itself: one plain curve.
    lines = _epoch_lines(sro_history(second_pass=False), "a")
    assert [line[2] for line in lines] == ["-"] and lines[0][0] == [0.0, 0.5, 1.0, 1.5, 2.0]
    d = _write(tmp_path, "sro_run", sro_history())
    png, md_path = write_report(str(d))
    assert _png_size(png) == (1400, 600)
    md = open(md_path, encoding="utf-8").read()
    assert "- SRO: pass 2 restarted" in md
    # stage, phase, excluded, peak epoch (b's peak in the probe), rolled back to, ...
    assert _row(md, "1")[:5] == ["1", "schedule", "b", "1", "-"]
    assert _row(md, "2")[:3] == ["2", "schedule", "none"]
    assert _row(md, "a")[:3] == ["a", "yes", "-"] and _row(md, "b")[:3] == ["b", "no", "1"]


def test_a_final_model_from_a_rolled_back_branch_keeps_that_compute(tmp_path):
    """The best pooled evaluation can be a state its stage later rolled back from (eval 3: stage 0
    rolled back to eval 2). The training from eval 2 to eval 3 is in the final model: it is neither
    discarded nor counted among the roll-backs' discarded compute."""
    from msft_fast.report import describe_compute

    h = msft_history()
    h["final"] = {"eval_id": 3, "pooled_val_loss": h["evals"][3]["pooled_val_loss"]}
    h["totals"]["final_kept_train_flops"] = 3 * TF
    assert ("train 9.00 TFLOP: 3.00 TFLOP (33.3%) kept in the final model, 6.00 TFLOP (66.7%) discarded, of which "
            "3.00 TFLOP rolled back by roll-backs") in describe_compute(h)
    # The stage table agrees: stage 0 rolled back 2 TFLOP and 20 steps, of which 1 TFLOP and 10 steps
    # lead to the final model and count as kept (never both kept and rolled back).
    _, md_path = write_report(str(_write(tmp_path, "final_in_branch", h)))
    md = open(md_path, encoding="utf-8").read()
    assert _row(md, "0")[:7] == ["0", "a", "1", "2", "20", "10", "4.00 TFLOP"] and _row(md, "0")[7] == "1.00 TFLOP"
    assert ("Stage 0: the final model (eval 3) is a state this stage rolled back from, so the 10 step(s) and "
            "1.00 TFLOP that lead to it count as kept, not rolled back.") in md


def _rolled_back_at_the_start_history(values_b=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)):
    """Stage 0 excludes b at its stage start (rolled back to eval 0, evals 1-3 discarded); the final
    model is eval 2, in that discarded branch; stage 1 trains a alone (evals 4-5)."""
    rows = [(0, 0, 0.0, 0, 0, 3.0), (1, 10, 0.5, 0, 1, 2.5), (2, 20, 1.0, 0, 2, 2.0), (3, 30, 1.5, 0, 3, 1.8),
            (4, 10, 0.5, 1, 4, 2.4), (5, 20, 1.0, 1, 5, 2.2)]
    evals = [_eval(i, st, ep, sg, tf * TF, 1e9, {"a": la, "b": lb}, {"a", "b"} if sg == 0 else {"a"})
             for (i, st, ep, sg, tf, la), lb in zip(rows, values_b)]
    return {"format_version": 1, "status": "finished", "method": "msft", "tasks": ["a", "b"], "evals": evals,
            "stages": [{"stage": 0, "excluded": "b", "rollback_to_eval": 0, "start_eval": 0, "end_eval": 3},
                       {"stage": 1, "excluded": None, "rollback_to_eval": None, "start_eval": 0, "end_eval": 5}],
            "final": {"eval_id": 2, "pooled_val_loss": 1.0}, "totals": {"train_flops": 5 * TF, "eval_flops": 1e10}}


def test_curves_draw_only_what_was_trained(tmp_path):
    """Solid lines join a state to the next one trained from it: the kept path goes 0 -> 4 -> 5, the
    discarded branch 0 -> 1 -> 2 -> 3 (with the final model, eval 2) is dotted, and the roll-back
    from 3 back to 0 is a sparse-dotted jump, never a solid line."""
    h = _rolled_back_at_the_start_history()
    lines = _epoch_lines(h, "a")
    solid = [(xs, ys) for xs, ys, style in lines if style == "-"]
    assert solid == [([0.0, 0.5, 1.0], [3.0, 2.4, 2.2])]
    assert ([0.0, 0.5, 1.0, 1.5], [3.0, 2.5, 2.0, 1.8], ":") in lines
    assert ([1.5, 0.0], [1.8, 3.0], (0, (1, 3))) in lines
    png, _ = write_report(str(_write(tmp_path, "rolled_back_at_start", h)))
    assert _png_size(png) == (1400, 600)


def test_a_log_axis_when_the_curves_span_more_than_tenfold():
    from msft_fast.report import _Run, use_log_axis

    assert not use_log_axis(_Run(msft_history()))  # losses 1.2 to 4: linear
    wide = _rolled_back_at_the_start_history(values_b=(11.0, 10.5, 10.0, 9.8, 9.9, 10.2))
    wide["evals"][5]["tasks"]["a"]["val_loss"] = 0.05
    assert use_log_axis(_Run(wide))
    assert not use_log_axis(_Run(_rolled_back_at_the_start_history()))  # exact zeros: no log axis
