"""mSFT: the controller's decisions on scripted curves, the snapshot pool, and tiny end-to-end runs
of msft and sro whose history.json must be self-consistent."""
from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import demo_tasks, tiny_llama

from msft_fast.config import load_config
from msft_fast.errors import ConfigError
from msft_fast.methods.msft import choose_exclusion, peak_confirmed, task_peaks

A, B, C = "a", "b", "c"


def curves(**per_task):
    """curves(a=[...], b=[...]) -> [{a: .., b: ..}, ...] per evaluation."""
    n = len(next(iter(per_task.values())))
    return [{k: v[i] for k, v in per_task.items()} for i in range(n)]


def test_the_earliest_peaking_task_is_excluded_and_rolled_back_to_its_peak():
    costs = curves(a=[3, 2, 1, 0.5], b=[3, 1, 2, 2.5], c=[3, 2, 1.5, 1.6])
    d = choose_exclusion(costs, [A, B, C], "most_overfit")
    assert (d.excluded, d.peak_index) == (B, 1)
    assert d.peaks == {A: 3, B: 1, C: 2}


def test_nothing_is_excluded_when_every_task_peaks_at_the_last_evaluation():
    costs = curves(a=[3, 2, 1], b=[3, 2.5, 2])
    d = choose_exclusion(costs, [A, B], "most_overfit")
    assert d.excluded is None and d.peak_index is None


def test_a_task_that_only_gets_worse_peaks_at_the_stage_start():
    costs = curves(a=[1, 2, 3], b=[3, 2, 1])
    d = choose_exclusion(costs, [A, B], "first")
    assert (d.excluded, d.peak_index) == (A, 0)


def test_ties_in_peak_time_break_by_overfit_or_config_order():
    costs = curves(a=[3, 1, 1.1], b=[3, 1, 2], c=[3, 2, 1])
    assert choose_exclusion(costs, [A, B, C], "most_overfit").excluded == B  # rose most since the peak
    assert choose_exclusion(costs, [A, B, C], "first").excluded == A
    equal = curves(a=[3, 1, 2], b=[3, 1, 2])
    assert choose_exclusion(equal, [A, B], "most_overfit").excluded == A


def test_equal_costs_count_the_latest_evaluation_or_the_papers_earliest_and_inactive_tasks_are_ignored():
    costs = curves(a=[2, 1, 1, 1], b=[3, 2, 1, 0], c=[0, 9, 9, 9])
    # a reached its best at eval 1 and held it: by default it has not peaked (nothing got worse)
    assert task_peaks(costs, [A, B]) == {A: 3, B: 3}
    assert choose_exclusion(costs, [A, B], "first").excluded is None
    # msft.peak_ties=earliest, the paper's raw argmax: a peaked at 1; c is not active
    assert task_peaks(costs, [A, B], "earliest") == {A: 1, B: 3}
    assert choose_exclusion(costs, [A, B], "first", ties="earliest").excluded == A
    slipped = curves(a=[2, 1, 1, 1.5], b=[3, 2, 1, 0])  # worse after the plateau: peaked at its latest best
    assert choose_exclusion(slipped, [A, B], "first").peak_index == 2
    assert choose_exclusion(slipped, [A, B], "first", ties="earliest").peak_index == 1


def test_a_task_flat_at_zero_exact_match_is_not_excluded_at_the_stage_start():
    """Exact match stuck at 0 while the pooled metric rises: the task has not peaked; the paper's
    rule (peak_ties=earliest) would exclude it at eval 0 and roll everything back."""
    from msft_fast.methods.metric import Metric

    cost = Metric("val_exact_match").cost
    costs = curves(capitals=[cost(0.0)] * 4, upper=[cost(0.1), cost(0.4), cost(0.6), cost(0.55)])
    d = choose_exclusion(costs, ["capitals", "upper"], "most_overfit")
    assert d.peaks == {"capitals": 3, "upper": 2} and (d.excluded, d.peak_index) == ("upper", 2)
    paper = choose_exclusion(costs, ["capitals", "upper"], "most_overfit", ties="earliest")
    assert (paper.excluded, paper.peak_index) == ("capitals", 0)


def test_a_diverged_evaluation_never_counts_as_a_peak():
    from msft_fast.methods.metric import Metric

    cost = Metric("val_loss").cost
    costs = curves(a=[cost(3.0), cost(2.0), cost(math.nan)], b=[cost(3.0), cost(2.5), cost(2.0)])
    assert task_peaks(costs, [A, B]) == {A: 1, B: 2}
    assert Metric("val_token_acc").cost(0.7) == -0.7


def test_patience_confirms_the_earliest_peak_after_enough_evaluations():
    costs = curves(a=[3, 1, 2], b=[3, 2, 1])
    assert not peak_confirmed(costs, [A, B], patience=2)
    costs = curves(a=[3, 1, 2, 2.5], b=[3, 2, 1, 0.5])
    assert peak_confirmed(costs, [A, B], patience=2)
    assert not peak_confirmed(curves(a=[3, 2, 1]), [A], patience=1)


def test_min_delta_counts_a_task_within_it_of_its_best_as_still_improving():
    costs = curves(a=[3, 1.0, 1.02, 1.01], b=[3, 2, 1.5, 1.2])
    assert choose_exclusion(costs, [A, B], "first").excluded == A  # the raw argmax: a peaked at 1
    d = choose_exclusion(costs, [A, B], "first", min_delta=0.05)
    assert d.excluded is None and d.peaks == {A: 3, B: 3}
    worse = curves(a=[3, 1.0, 1.02, 1.06], b=[3, 2, 1.5, 1.2])  # 0.06 worse than its best: peaked
    assert (choose_exclusion(worse, [A, B], "first", min_delta=0.05).excluded,
            choose_exclusion(worse, [A, B], "first", min_delta=0.05).peak_index) == (A, 1)
    # A flat curve (exact match stuck at 0): the paper's argmax counts its first evaluation as the
    # peak; with any min_delta, or by default (latest of equal bests), it is still improving.
    flat = curves(a=[-0.0, -0.0, -0.0], b=[3, 2, 1])
    assert choose_exclusion(flat, [A, B], "first", ties="earliest").peak_index == 0
    assert choose_exclusion(flat, [A, B], "first", min_delta=1e-9, ties="earliest").excluded is None
    assert choose_exclusion(flat, [A, B], "first").excluded is None
    assert peak_confirmed(costs, [A, B], patience=2) and not peak_confirmed(costs, [A, B], 2, min_delta=0.05)


@pytest.mark.slow
def test_min_delta_keeps_a_jittery_task_and_the_run_goes_on_from_the_roll_outs_end(tmp_path, demo_dir):
    import metric_callbacks

    metric_callbacks.PLATEAU[0] = 0
    history = _run(tmp_path, demo_dir, "method=msft", "msft.budget_epochs=1", "msft.max_stages=1",
                   "msft.min_delta=0.05", "msft.metric=metric_callbacks:plateau", "train.epochs=1")
    (stage,) = history["stages"]
    for task in history["tasks"]:  # each task's raw argmax is eval 1, not the roll-out's last
        curve = [e["tasks"][task]["metric"] for e in history["evals"]]
        assert len(curve) == 5 and curve.index(max(curve)) == 1
    assert stage["excluded"] is None and stage["rollback_to_eval"] is None
    assert stage["peak_evals"] == dict.fromkeys(history["tasks"], 4)
    assert history["snapshot_pool"]["states"] == 5  # tasks + the best pooled state + the latest
    _assert_consistent(history)


class _ShardedTinyModel:
    """A one-rank FSDP2 tiny Llama with AdamW and one packed batch: `step()` trains, `state()` copies
    this rank's parameter shards and Adam state for bitwise comparisons."""

    def __init__(self, tokenizer, device):
        from msft_fast.data.packing import collate, plan_epoch
        from msft_fast.runtime.distributed import parallelize
        from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks
        from test_packing import _tasks

        lm = tiny_llama(tokenizer)
        self.model = CausalLMWithTaskLoss(lm, num_tasks=2)
        parallelize(self.model, decoder_blocks(lm), torch.float32, device, fsdp="always")  # sharded state
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        docsets = [t.train for t in _tasks(6, 4, seed=1)]
        self.batch = collate(plan_epoch(docsets, [0, 1], 10_000, seed=0, epoch=0)[0], docsets, [0, 1])

    def step(self):
        self.model(self.batch)[0].backward()
        self.opt.step()
        self.opt.zero_grad()

    def state(self):
        from msft_fast.runtime.distributed import reshard_all

        reshard_all(self.model)
        params = [p.detach().to_local().clone() for p in self.model.parameters()]
        moments = [{k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in self.opt.state[p].items()}
                   for p in self.model.parameters()]
        return params, moments


@pytest.fixture
def sharded_tiny(tokenizer):
    from msft_fast.runtime.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed()
    try:
        yield _ShardedTinyModel(tokenizer, ctx.device), ctx.device
    finally:
        shutdown_distributed()


def test_pool_restores_weights_and_adam_state_bitwise_and_reuses_released_buffers(sharded_tiny):
    from msft_fast.state.snapshot import SnapshotPool

    t, device = sharded_tiny
    model, opt, step, state = t.model, t.opt, t.step, t.state
    pool = SnapshotPool(capacity=2, device=device, with_optimizer=True)
    step()
    with torch.no_grad():
        model(t.batch)  # an evaluation leaves the root unsharded
    want = state()
    snap = pool.retain(pool.capture(model, opt, {"tag": 1}))
    for _ in range(3):
        step()
    pool.restore(snap, model, opt)
    got = state()
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    for a, b in zip(got[1], want[1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Training on from the restored state repeats the same trajectory.
    step()
    after_one = state()
    pool.restore(snap, model, opt)
    step()
    assert all(torch.equal(a, b) for a, b in zip(state()[0], after_one[0]))

    other = pool.retain(pool.capture(model, opt, {}))
    with pytest.raises(RuntimeError, match="pool is full"):
        pool.capture(model, opt, {})
    buffers = snap.params[0].data_ptr()
    pool.release(snap)
    third = pool.capture(model, opt, {})
    assert third.params[0].data_ptr() == buffers  # the released state's buffers were reused
    pool.release(other)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(other)


def test_pool_spills_older_states_to_disk_and_restores_them_bitwise(sharded_tiny, tmp_path):
    from msft_fast.state.snapshot import SnapshotPool

    t, device = sharded_tiny
    model, opt, step, state = t.model, t.opt, t.step, t.state
    spill = tmp_path / "spill"
    pool = SnapshotPool(capacity=3, device=device, with_optimizer=True, in_memory=1, spill_dir=str(spill))
    wants, snaps = [], []
    for _ in range(3):
        step()
        wants.append(state())
        snaps.append(pool.retain(pool.capture(model, opt, {})))
    # One state in memory (the newest), the two older ones in files.
    assert [s.spilled is not None for s in snaps] == [True, True, False]
    assert sorted(os.listdir(spill)) == ["snapshot-0.pt", "snapshot-1.pt"]
    for snap, want in zip(snaps, wants):
        step()
        pool.restore(snap, model, opt)
        got = state()
        assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
        for a, b in zip(got[1], want[1]):
            assert all(torch.equal(a[k], b[k]) for k in a)
    pool.release(snaps[0])
    assert sorted(os.listdir(spill)) == ["snapshot-1.pt"]  # a released spilled state leaves no file
    with pytest.raises(ValueError, match="spill_dir"):
        SnapshotPool(capacity=3, device=device, in_memory=1)


def test_the_pool_plan_spills_or_names_the_setting_when_host_memory_is_short(tokenizer, monkeypatch):
    import msft_fast.state.snapshot as snapshot

    lm = tiny_llama(tokenizer)
    per_state = 3 * sum(p.numel() * 4 for p in lm.parameters())
    monkeypatch.setattr(snapshot, "host_memory_available", lambda: int(2.5 * per_state / 0.8))
    plan = snapshot.plan_pool(lm, states=6, with_optimizer=True, ranks_per_host=1, spill_dir="/tmp/x")
    assert plan["in_memory_states"] == 2 and plan["spill_dir"] == "/tmp/x"
    with pytest.raises(ConfigError, match="msft.snapshot_spill_dir"):
        snapshot.plan_pool(lm, states=6, with_optimizer=True, ranks_per_host=1)
    assert snapshot.plan_pool(lm, states=2, with_optimizer=True, ranks_per_host=1)["in_memory_states"] == 2


def test_the_pool_plan_counts_pinned_buffers_rounded_up_to_a_power_of_two(tokenizer, monkeypatch):
    """Page-locked host buffers come from torch's caching host allocator, which rounds each block up
    to a power of two: a state of shards just over a power of two takes nearly twice its bytes."""
    import msft_fast.state.snapshot as snapshot

    assert [snapshot.host_buffer_bytes(n, True) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
    assert snapshot.host_buffer_bytes(1025, False) == 1025 and snapshot.host_buffer_bytes(0, True) == 0
    lm = tiny_llama(tokenizer)
    monkeypatch.setattr(snapshot, "host_memory_available", lambda: None)
    plain = snapshot.plan_pool(lm, states=3, with_optimizer=True, ranks_per_host=1)
    pinned = snapshot.plan_pool(lm, states=3, with_optimizer=True, ranks_per_host=1, pinned=True)
    rounded = sum(snapshot.host_buffer_bytes(p.numel() * 4, True) for p in lm.parameters())
    assert pinned["bytes_per_state"] == 3 * rounded > plain["bytes_per_state"] == 3 * sum(p.numel() * 4 for p in lm.parameters())
    assert pinned["bytes_per_rank"] == 3 * pinned["bytes_per_state"] and pinned["pinned"] and not plain["pinned"]


def test_the_pool_plan_says_why_it_spills_or_not():
    from msft_fast.methods.msft import spill_reason

    plan = {"states": 4, "in_memory_states": 4, "bytes_per_host": 3 * 2**20, "host_available": 2**34}
    assert spill_reason(plan, None) == ("the worst case (4 states, 3.0 MiB on this host) fits in host memory; "
                                        "nothing spills (msft.snapshot_spill_dir is not set, and not needed)")
    assert spill_reason(plan, "/spill").endswith("fits in host memory, so nothing spills to msft.snapshot_spill_dir")
    assert "could not be measured" in spill_reason({**plan, "host_available": -1}, None)
    assert spill_reason({**plan, "in_memory_states": 2}, "/spill") == (
        "host memory holds 2 of the 4 states the run may need at once; older states spill to "
        "msft.snapshot_spill_dir (/spill)")


def _run(tmp_path, demo_dir, *overrides):
    from msft_fast.run import train

    names = ("upper", "noisy_codes", "sort")
    tasks = demo_tasks(demo_dir, names)
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"data.tasks=[{tasks}]", "data.max_seq_len=64",
        "data.tokens_per_batch=512", f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false",
        "train.lr=3e-3", "train.epochs=2", "train.schedule=constant", "msft.evals_per_epoch=4", *overrides,
    ])
    return train(cfg)


def _assert_consistent(history):
    evals = {e["eval_id"]: e for e in history["evals"]}
    sign = -1 if history["higher_is_better"] else 1
    cost = lambda e, task: sign * e["tasks"][task]["metric"]  # noqa: E731
    for stage in history["stages"]:
        in_stage = [evals[stage["start_eval"]]] + [e for e in history["evals"] if e["stage"] == stage["stage"]
                                                   and e["eval_id"] != stage["start_eval"]]
        active = [t for t, v in in_stage[-1]["tasks"].items() if v["active"]]
        if stage["excluded"] is not None:
            task, target = stage["excluded"], stage["rollback_to_eval"]
            # of equal bests, the latest (msft.peak_ties, default) or the earliest (the paper's rule)
            tie = -1 if history["config"]["msft"]["peak_ties"] == "latest" else 1
            best = min(in_stage, key=lambda e: (cost(e, task), tie * e["eval_id"]))
            assert best["eval_id"] == target == stage["peak_evals"][task]
            for other in active:
                assert stage["peak_evals"][other] >= target
            assert stage["discarded_flops"] > 0 or target == in_stage[-1]["eval_id"]
        else:
            assert all(stage["peak_evals"][t] == in_stage[-1]["eval_id"] for t in active)
    pooled = {e["eval_id"]: sign * e["pooled_metric"] for e in history["evals"]}
    assert history["final"]["eval_id"] == min(pooled, key=lambda i: (pooled[i], i))
    assert history["totals"]["discarded_flops"] == sum(s["discarded_flops"] for s in history["stages"])
    assert history["totals"]["epochs_trained"] == pytest.approx(sum(s["epochs_trained"] for s in history["stages"]))
    totals = history["totals"]
    assert totals["final_discarded_train_flops"] == totals["train_flops"] - totals["final_kept_train_flops"] >= 0
    from msft_fast.report import _Run

    split = _Run(history).compute()  # what report.md, compare and the console say
    assert split["kept"] == totals["final_kept_train_flops"]
    assert split["discarded"] == totals["final_discarded_train_flops"]
    assert 0 <= split["rolled_back"] <= split["discarded"]
    # The final weights descend from kept_train_flops of training; each roll-back sets it back.
    final = evals[history["final"]["eval_id"]]
    assert history["totals"]["final_kept_train_flops"] == final["kept_train_flops"] <= final["train_flops"]
    for stage in history["stages"]:
        if stage["rollback_to_eval"] is not None and stage["discarded_flops"] > 0:
            later = [e for e in history["evals"] if e["stage"] > stage["stage"]]
            target = evals[stage["rollback_to_eval"]]
            assert all(e["kept_train_flops"] - target["kept_train_flops"] <= e["train_flops"] - evals[stage["end_eval"]]["train_flops"]
                       for e in later)


@pytest.mark.slow
def test_msft_end_to_end_history_is_consistent(tmp_path, demo_dir):
    history = _run(tmp_path, demo_dir, "method=msft", "msft.budget_epochs=0.75", "msft.max_stages=4")
    assert history["status"] == "finished" and history["method"] == "msft"
    excluded = [s["excluded"] for s in history["stages"] if s["excluded"]]
    assert excluded, "the tiny mixture overfits within the budget: something must be excluded"
    assert len(set(excluded)) == len(excluded)
    _assert_consistent(history)
    # Excluded tasks stay excluded in every later evaluation.
    for stage in history["stages"]:
        if stage["excluded"]:
            later = [e for e in history["evals"] if e["stage"] > stage["stage"]]
            assert all(not e["tasks"][stage["excluded"]]["active"] for e in later)
    assert history["snapshot_pool"]["states"] == 4 and history["snapshot_pool"]["bytes_per_state"] > 0
    assert history["totals"]["snapshot_seconds"] >= 0 and history["totals"]["restore_seconds"] > 0


@pytest.mark.slow
def test_msft_compute_bound_decisions_on_the_console_and_counts(tmp_path, demo_dir, caplog, capsys):
    """msft.max_epochs cuts the last roll-out so that the epochs trained (kept and discarded) never
    exceed it; every stage's decision is logged; the worst case is logged at the start; progress goes
    to the log as lines (stderr is no terminal here); a val_fraction task's counts are in history.json."""
    from msft_fast.report import format_flops

    sort = f"{{name: sort, train: {demo_dir / 'sort' / 'train.jsonl'}, val_fraction: 0.1}}"
    with caplog.at_level("INFO", logger="msft_fast"):
        history = _run(tmp_path, demo_dir, "method=msft", "msft.budget_epochs=0.75", "msft.max_stages=4",
                       "msft.max_epochs=1.1", f"data.tasks[2]={sort}", "train.progress=true",
                       "train.progress_interval=0.001")
    _assert_consistent(history)
    bound, stages = history["compute_bound"], history["stages"]
    assert bound["max_epochs"] == 1.1 and bound["worst_case_epochs"] == 1.1 and bound["stop_reason"] == "max_epochs"
    trained = sum(s["epochs_trained"] for s in stages)
    assert trained <= 1.1 and trained == pytest.approx(bound["epochs_trained"]) == history["totals"]["epochs_trained"]
    assert len(stages) == 2 and 0.3 < stages[1]["epochs_trained"] < 0.75  # the second roll-out was cut
    assert history["totals"]["train_flops"] <= bound["worst_case_train_flops"]
    assert len(history["evals"]) <= bound["worst_case_evals"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("mSFT compute bound: at most 1.1 epochs trained over all stages") for m in messages)
    for st in stages:
        line = next(m for m in messages if m.startswith(f"stage {st['stage']}: "))
        active = [t for t in history["tasks"] if history["evals"][st["end_eval"]]["tasks"][t]["active"]
                  and t != st["excluded"]]
        assert f"{len(active)} task(s) still active: {', '.join(active)}" in line
        if st["excluded"]:
            peak = history["evals"][st["rollback_to_eval"]]
            assert (f"excluded '{st['excluded']}', which peaked at eval {peak['eval_id']} (epoch {peak['epoch']:.2f}, "
                    f"val_loss {peak['tasks'][st['excluded']]['val_loss']:.4f})") in line
            assert f"{st['steps_discarded']} step(s) and {format_flops(st['discarded_flops'])} discarded" in line
        else:
            assert "nothing excluded" in line
    assert any("mSFT stopped after 2 stage(s): the compute bound msft.max_epochs was reached" in m for m in messages)
    assert any(m.startswith("compute: train ") and "kept in the final model" in m for m in messages)
    err = capsys.readouterr().err
    # Progress lines (no bar frames), with the worst case the bound allows: steps, share done and ETA.
    assert "\r" not in err
    progress = [m for m in messages if m.startswith("step ")]
    assert progress and all("train tokens/s" in m for m in progress)
    worst = history["compute_bound"]["worst_case_steps"]
    assert all(f"/<={worst} (>=" in m for m in progress) and any("ETA <=" in m for m in progress)
    counts = history["data"]["sort"]
    assert counts["val_held_out"] == counts["val_docs"] == round(0.1 * counts["train_rows"]) > 0
    assert counts["train_docs"] + counts["val_docs"] == counts["train_rows"]
    assert history["data"]["upper"]["val_docs"] == history["data"]["upper"]["val_rows"] > 0
    assert "fits in host memory" in history["snapshot_pool"]["spill_reason"]


@pytest.mark.slow
def test_msft_stops_after_stale_stages_and_warns_of_one_evaluation_roll_outs(tmp_path, demo_dir, caplog):
    with caplog.at_level("INFO", logger="msft_fast"):
        history = _run(tmp_path, demo_dir, "method=msft", "msft.budget_epochs=0.25", "msft.evals_per_epoch=4",
                       "msft.max_stale_stages=1", "msft.metric=metric_callbacks:getting_worse", "train.epochs=1")
    (stage,) = history["stages"]
    assert stage["excluded"] == "upper" and stage["rollback_to_eval"] == 0  # everyone got worse: back to the start
    assert history["compute_bound"]["stop_reason"] == "max_stale_stages" and history["final"]["eval_id"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("stage 0: the roll-out of 0.25 epoch(s)" in w and "fewer than 2 evaluations" in w for w in warnings)
    assert any("no better pooled evaluation in this roll-out" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_msft_patience_ends_roll_outs_early_and_weights_restore_runs(tmp_path, demo_dir):
    history = _run(tmp_path, demo_dir, "method=msft", "msft.budget_epochs=1", "msft.max_stages=2",
                   "msft.patience=1", "msft.restore=weights", "msft.metric=val_token_acc")
    _assert_consistent(history)
    assert history["metric"] == "val_token_acc" and history["higher_is_better"]
    # With patience 1 a roll-out stops one evaluation after the earliest peak, short of its budget.
    stages = [s for s in history["stages"] if s["excluded"]]
    assert stages and any(s["end_eval"] - s["start_eval"] < 6 for s in stages)


@pytest.mark.slow
def test_sro_excludes_each_task_at_its_probe_peak(tmp_path, demo_dir, caplog):
    with caplog.at_level("INFO", logger="msft_fast"):
        history = _run(tmp_path, demo_dir, "method=sro")
    probe, *schedule = history["stages"]
    assert probe["phase"] == "probe" and all(s["phase"] == "schedule" for s in schedule)
    evals = {e["eval_id"]: e for e in history["evals"]}
    peak_epoch = {t: evals[i]["epoch"] for t, i in probe["peak_evals"].items()}
    end = evals[probe["end_eval"]]["epoch"]
    early = sorted((t for t in peak_epoch if peak_epoch[t] < end),
                   key=lambda t: (peak_epoch[t], history["tasks"].index(t)))
    assert early, "on this mixture some task peaks before the probe's end"
    # Tasks that peaked before the probe's end leave in peak order; the others train to the end
    # (no exclusion "at the end" that would list them as excluded and active at once).
    assert [s["excluded"] for s in schedule if s["excluded"]] == early
    if len(early) < len(history["tasks"]):
        assert schedule[-1]["excluded"] is None
    for s in schedule:
        if s["excluded"]:
            assert evals[s["peak_evals"][s["excluded"]]]["epoch"] == peak_epoch[s["excluded"]]
            assert all(not e["tasks"][s["excluded"]]["active"] for e in history["evals"] if e["stage"] > s["stage"])
            said = f"sro pass 2: excluded '{s['excluded']}' at epoch {peak_epoch[s['excluded']]:.2f}"
            assert any(said in r.getMessage() for r in caplog.records)
    assert history["sro"]["second_pass"] is True
    schedule_evals = [e for e in history["evals"] if e["stage"] >= 1] + [evals[probe["start_eval"]]]
    best = min(schedule_evals, key=lambda e: (e["pooled_metric"], e["eval_id"]))
    assert history["final"]["eval_id"] == best["eval_id"]
    assert history["totals"]["train_flops"] > probe["train_flops"]  # the probe's compute counts too
    assert history["totals"]["epochs_trained"] == pytest.approx(sum(s["epochs_trained"] for s in history["stages"]))
    epochs = history["config"]["train"]["epochs"]  # the probe's; pass 2 ends at the last task's peak or there
    assert history["totals"]["epochs_trained"] == pytest.approx(
        epochs + (max(peak_epoch.values()) if len(early) == len(history["tasks"]) else epochs), abs=0.05)


@pytest.mark.slow
def test_sro_skips_a_second_pass_that_would_repeat_the_first(tmp_path, demo_dir, caplog):
    with caplog.at_level("INFO", logger="msft_fast"):
        history = _run(tmp_path, demo_dir, "method=sro", "train.epochs=0.5",
                       "msft.metric=metric_callbacks:always_improving")
    (probe,) = history["stages"]  # no schedule stage at all
    assert probe["phase"] == "probe" and history["sro"]["second_pass"] is False
    last = history["evals"][-1]
    assert probe["end_eval"] == last["eval_id"] == history["final"]["eval_id"] and last["stage"] == 0
    assert history["totals"]["train_flops"] == probe["train_flops"]
    assert history["totals"]["final_discarded_train_flops"] == 0
    assert any("sro: pass 2 skipped: no task peaked before pass 1's last evaluation" in r.getMessage()
               for r in caplog.records)
    md = open(tmp_path / "run" / "report.md").read()
    assert "- SRO: pass 2 skipped" in md


@pytest.mark.slow
def test_a_user_metric_callback_runs_generate_on_the_sharded_model(tmp_path, demo_dir):
    import metric_callbacks

    history = _run(tmp_path, demo_dir, "method=msft", "msft.budget_epochs=0.5", "msft.max_stages=2",
                   "msft.metric=metric_callbacks:greedy_match", "train.epochs=1")
    assert metric_callbacks.CALLS and set(metric_callbacks.CALLS) == {3}
    assert history["metric"] == "metric_callbacks:greedy_match" and history["higher_is_better"]
    first = history["evals"][0]
    assert first["pooled_metric"] == pytest.approx(sum(t["metric"] for t in first["tasks"].values()) / 3)
    _assert_consistent(history)


def test_a_metric_callback_that_does_not_import_is_a_config_error(tmp_path, demo_dir):
    from msft_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="msft.metric.*cannot import 'nowhere:score'"):
        _run(tmp_path, demo_dir, "method=msft", "msft.metric=nowhere:score")
