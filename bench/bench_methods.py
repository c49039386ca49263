"""Quality against training FLOPs, and what each method costs besides its training steps: runs of the real
trainer from the same warmed-up model and mixture (default: the demo, made in --workdir as `make demo`
makes it), so that a difference between runs is the method's or the setting's (bench/README.md says how).

    python bench/bench_methods.py [--seeds 0 1 2] [--methods sft msft sro ies dynamix]   # every method
    python bench/bench_methods.py --budgets 0.5 1 2 [--sft-epochs 1 2 3 4] [--patience 1]
    python bench/bench_methods.py --quick      # a tiny mixture: SFT 1, 2 epochs, mSFT C=0.5 +- patience

Writes methods_<device> or budget_<device>[_quick] .json and .md, rewritten after every run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, machine_info, table, write_outputs  # noqa: E402

DEFAULT_WORKDIR = "/tmp/bench_work"  # the demo workspace: never the repo's data/ and runs/
# IES's reference rule (window 3) needs 6 recorded losses per document before it may master one: within
# the demo's epochs it could never fire, so the demo runs it with window 1.
METHODS = {"sft": ["method=sft"], "msft": ["method=msft"], "sro": ["method=sro"],
           "ies": ["method=ies", "ies.window=1"], "dynamix": ["method=dynamix"]}


def prepare_demo(workdir: str) -> None:
    """The demo mixture and the warmed-up tiny model in `workdir` as `make demo` makes them in the repo (once;
    the demo configs' relative paths resolve there, train_in_process's working directory)."""
    import shutil

    from msft_fast.demo_data import write_demo_mixture

    os.makedirs(workdir, exist_ok=True)
    data = os.path.join(workdir, "data", "demo")
    manifest = os.path.join(data, "manifest.json")
    before = open(manifest).read() if os.path.exists(manifest) else None
    write_demo_mixture(data, seed=0, variant="calibrated")
    if open(manifest).read() != before:  # a warm-up trained on other data
        shutil.rmtree(os.path.join(workdir, "runs", "demo_warmup"), ignore_errors=True)
    if not os.path.exists(os.path.join(workdir, "runs", "demo_warmup", "final", "config.json")):
        train_in_process(os.path.join(REPO, "configs", "demo_warmup.yaml"), workdir, ["output_dir=runs/demo_warmup"])


def quick_config(workdir: str) -> str:
    """A tiny three-task mixture (copy, upper, reverse words) for the built-in model: --quick runs of
    the real trainer in seconds. Returns the config's path."""
    import random

    import yaml

    root, rng, tasks = os.path.join(workdir, "quick"), random.Random(0), []
    makers = {"copy": lambda w: w, "upper": str.upper, "reverse": lambda w: w[::-1]}
    for name, make in makers.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for split, n in (("train", 48 if name == "copy" else 96), ("val", 12)):
            with open(os.path.join(root, name, f"{split}.jsonl"), "w") as f:
                for _ in range(n):
                    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(4, 12)))
                    f.write(json.dumps({"prompt": f"{name}: {word} =", "completion": f" {make(word)}"}) + "\n")
        tasks.append({"name": name, **{s: os.path.join(root, name, f"{s}.jsonl") for s in ("train", "val")}})
    config = {"method": "msft", "output_dir": os.path.join(workdir, "runs", "quick"),
              "model": {"path": "builtin:tiny-llama"},
              "data": {"tasks": tasks, "max_seq_len": 64, "tokens_per_batch": 256},
              "train": {"lr": 3.0e-3, "epochs": 2, "seed": 0, "warmup_steps": 2, "schedule": "constant"},
              "msft": {"budget_epochs": 0.5, "evals_per_epoch": 4, "max_stages": 3}}
    path = os.path.join(root, "quick.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def train_in_process(config: str, workdir: str, overrides: list[str], log_name: str = "train.log") -> dict:
    """One run of the real trainer here, in `workdir` (tokenization cached there, console to log_name)."""
    from transformers.utils import logging as hf_logging

    from msft_fast.config import load_config
    from msft_fast.run import train

    hf_logging.disable_progress_bar()
    os.makedirs(workdir, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cfg = load_config(os.path.abspath(os.path.join(cwd, config)), [
            f"data.cache_dir={os.path.join(workdir, 'cache')}", "train.progress=false", *overrides])
        with open(os.path.join(workdir, log_name), "a") as log, contextlib.redirect_stdout(log):
            return train(cfg, overwrite=True)
    finally:
        os.chdir(cwd)


def run_one(config: str, workdir: str, label: str, overrides: list[str]) -> dict:
    """One run; its method's wall time (first evaluation to final restore) is split with the trainer's own
    clocks into training steps, evaluations, snapshot captures, restores and the rest (history and report
    writes, packing a new mixture, metric scores): what the method costs on top of its training steps."""
    import msft_fast.run as run_mod

    t0, wall, methods = time.time(), {}, dict(run_mod.METHODS)

    def timed(method):
        def run(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                wall["method"] = time.perf_counter() - start
        return run

    run_mod.METHODS.update({k: timed(f) for k, f in methods.items()})
    try:
        h = train_in_process(config, workdir, [f"output_dir=runs/budget_{label}", *overrides], log_name="budget.log")
    finally:
        run_mod.METHODS.update(methods)
    final = next(e for e in h["evals"] if e["eval_id"] == h["final"]["eval_id"])
    tot, summary = h["totals"], h.get(h["method"])
    seconds = {k: tot[f"{k}_seconds"] for k in ("train", "eval", "snapshot", "restore")}
    seconds["rest"] = wall["method"] - sum(seconds.values())
    return {"label": label, "method": h["method"], "overrides": overrides, "final_epoch": final["epoch"],
            "pooled_metric": final["pooled_metric"], "pooled_val_loss": final["pooled_val_loss"],
            "pooled_val_exact_match": final.get("pooled_val_exact_match"),  # None: answers not scored
            "tasks": {n: {k: t.get(k) for k in ("val_loss", "val_token_acc", "val_exact_match")}
                      for n, t in final["tasks"].items()},
            "metric": h["metric"], "higher_is_better": h["higher_is_better"],
            "generated_tokens": tot.get("generated_tokens"),
            **{k: tot[k] for k in ("train_flops", "discarded_flops", "eval_flops", "final_discarded_train_flops",
                                   "trained_tokens", "steps")},
            "excluded": [st["excluded"] for st in h["stages"] if st.get("excluded")], "wall_seconds": time.time() - t0,
            "method_seconds": wall["method"], "seconds": seconds,
            "share_of_training": {k: v / seconds["train"] for k, v in seconds.items() if k != "train"},
            "method_summary": summary.get("summary") if isinstance(summary, dict) else None}


def task_metric(run: dict, name: str) -> float:
    return run["tasks"][name][run["metric"] if run["metric"] in ("val_token_acc", "val_exact_match") else "val_loss"]


def compare(runs: list[dict]) -> dict:
    """Each mSFT run against the SFT runs: a win at its budget is a better pooled metric than the best SFT
    run that used no more training FLOPs (None: no SFT run was that cheap)."""
    sign = -1.0 if runs[0]["higher_is_better"] else 1.0  # cost = sign * metric: lower is better
    sft = [r for r in runs if r["method"] == "sft"]
    best = min(sft, key=lambda r: sign * r["pooled_metric"])
    out = {}
    for r in (r for r in runs if r["method"] == "msft"):
        cheaper = min((s for s in sft if s["train_flops"] <= r["train_flops"]), default=None,
                      key=lambda s: sign * s["pooled_metric"])
        as_good = min((s for s in sft if sign * s["pooled_metric"] <= sign * r["pooled_metric"]), default=None,
                      key=lambda s: s["train_flops"])
        out[r["label"]] = {
            "beats_best_sft_with_no_more_flops": None if cheaper is None else
            sign * r["pooled_metric"] < sign * cheaper["pooled_metric"],
            "best_sft_with_no_more_flops": cheaper and cheaper["label"],
            "pooled_metric_minus_best_sft": r["pooled_metric"] - best["pooled_metric"],
            "flops_over_best_sft": r["train_flops"] / best["train_flops"],
            "cheapest_sft_as_good": as_good and as_good["label"], "tasks_better_than_best_sft": [
                n for n in r["tasks"] if sign * task_metric(r, n) < sign * task_metric(best, n)]}
    return {"best_sft": best["label"], "msft": out}


def markdown(r: dict) -> list[str]:
    runs, m = r["runs"], r["machine"]
    tasks, metric = list(runs[0]["tasks"]), runs[0]["metric"]
    answers = metric != "val_exact_match" and runs[0]["pooled_val_exact_match"] is not None
    lines = [f"# Quality vs training FLOPs ({m['device']}, measured)", "",
             f"{r['date']}, commit {m.get('git_commit', '?')}, {m['cores']} cores, {m['torch_threads']} torch "
             f"thread(s), torch {m['torch']}; config `{r['setup']['config']}` {' '.join(r['setup']['overrides'])}; "
             f"final = the evaluation with the best pooled {metric} ("
             + ("higher" if runs[0]["higher_is_better"] else "lower") + " is better), selected on the validation "
             "split it is reported on, for every method alike", ""]
    by_method = {k: [x for x in runs if x["method"] == k] for k in dict.fromkeys(x["method"] for x in runs)}
    if any(len(xs) > 1 for xs in by_method.values()):
        lines += ["Mean over runs (min - max):", ""] + table(
            ["method", "runs", f"final pooled {metric}", "train GFLOP", "not in the final model", "eval GFLOP"],
            [[k, len(xs), _spread([x["pooled_metric"] for x in xs], ".4f"),
              _spread([x["train_flops"] / 1e9 for x in xs], ".0f")] + [
                f"{statistics.mean(x[f] for x in xs) / 1e9:.0f}" for f in ("final_discarded_train_flops", "eval_flops")]
             for k, xs in by_method.items()]) + [""]
    lines += table(["run", f"pooled {metric}"] + (["pooled exact match"] if answers else []) + tasks + [
        "final epoch", "train GFLOP (discarded; not in final)", "eval GFLOP", "what the method did", "wall s"],
                   [[x["label"], f"{x['pooled_metric']:.4f}"] + [f"{x['pooled_val_exact_match']:.4f}"] * answers
                    + [f"{task_metric(x, n):.3f}" for n in tasks]
                    + [f"{x['final_epoch']:.2f}", f"{x['train_flops'] / 1e9:.0f} ({x['discarded_flops'] / 1e9:.0f}; "
                       f"{x['final_discarded_train_flops'] / 1e9:.0f})", f"{x['eval_flops'] / 1e9:.0f}",
                       ("excluded " + ", ".join(x["excluded"])) if x["excluded"] else x["method_summary"] or "-",
                       f"{x['wall_seconds']:.0f}"] for x in runs])
    lines += ["", "Where each run's method time went, as a share of its training-step time (the trainer's clocks; "
              "the rest: history and report writes, packing a new mixture, metric scores):", ""] + table(
        ["run", "training steps s", "evaluation", "snapshot captures", "restores", "the rest", "all but evaluation"],
        [[x["label"], f"{x['seconds']['train']:.2f}"] + [_pct(x["share_of_training"][k]) for k in
                                                         ("eval", "snapshot", "restore", "rest")]
         + [_pct(sum(v for k, v in x["share_of_training"].items() if k != "eval"))] for x in runs])
    for seed, c in (r.get("comparison") or {}).items():
        lines += ["", f"Best SFT run{f' (seed {seed})' if seed != 'all' else ''}: {c['best_sft']}. Against SFT:", ""]
        for label, x in c["msft"].items():
            verdict = {True: "wins", False: "loses", None: "has no SFT run as cheap to compare with"}[
                x["beats_best_sft_with_no_more_flops"]]
            lines.append(f"- {label}: {verdict} against the best SFT run with no more training FLOPs "
                         f"({x['best_sft_with_no_more_flops'] or 'none'}); pooled {metric} "
                         f"{x['pooled_metric_minus_best_sft']:+.4f} vs the best SFT at {x['flops_over_best_sft']:.2f}x "
                         f"its FLOPs; the cheapest SFT run as good: {x['cheapest_sft_as_good'] or 'none'}; tasks "
                         f"better: {', '.join(x['tasks_better_than_best_sft']) or 'none'}")
    return lines + ["", "FLOPs: the trainer's counts. Discarded: rolled back or undone; not in final: training the "
                        "final weights do not descend from. Wall seconds depend on what else the machine ran."]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _spread(xs: list[float], spec: str) -> str:
    return f"{statistics.mean(xs):{spec}} ({min(xs):{spec}} - {max(xs):{spec}})"


def plan_runs(a) -> list[tuple[str, list[str]]]:
    if not a.budgets:
        return [(f"{m}_s{seed}", [*METHODS[m], f"train.seed={seed}"]) for seed in a.seeds or [0] for m in a.methods]
    plan = [(f"sft_{e:g}ep", ["method=sft", f"train.epochs={e:g}"]) for e in a.sft_epochs]
    for c in a.budgets:
        msft = ["method=msft", f"msft.budget_epochs={c:g}"]
        plan.append((f"msft_C{c:g}", [*msft, "msft.patience=null"]))
        plan += [(f"msft_C{c:g}_p{a.patience}", [*msft, f"msft.patience={a.patience}"])] if a.patience else []
    plan += [(m, METHODS[m]) for m in a.methods if m not in ("sft", "msft")]
    return [(f"{label}_s{s}", [*o, f"train.seed={s}"]) for s in a.seeds for label, o in plan] if a.seeds else plan


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo.yaml"),
                   help="a run config (method, epochs, budget, seed overridden); relative paths resolve in --workdir")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")
    p.add_argument("--methods", nargs="*", choices=list(METHODS), help="default: all; with --budgets: none beside")
    p.add_argument("--seeds", type=int, nargs="*", default=[], help="train.seed of each repetition (default 0 1 2; "
                   "with --budgets: the config's seed)")
    p.add_argument("--budgets", type=float, nargs="*", help="mSFT roll-out budgets C, against SFT at --sft-epochs")
    p.add_argument("--sft-epochs", type=float, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--patience", type=int, default=1, help="msft.patience of the 'with patience' runs (0: none)")
    p.add_argument("--quick", action="store_true", help="a tiny mixture: SFT 1, 2 epochs, mSFT C=0.5 +- patience")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results do not depend on it)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    a = p.parse_args(argv)
    import logging

    import torch

    logging.getLogger("msft_fast").setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.config, a.sft_epochs, a.budgets = quick_config(a.workdir), [1, 2], [0.5]
    else:
        prepare_demo(a.workdir)
    a.methods = a.methods if a.methods is not None else ([] if a.budgets else list(METHODS))
    a.seeds = a.seeds or ([] if a.budgets else [0, 1, 2])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem = (f"budget_{device}" if a.budgets else f"methods_{device}") + ("_quick" if a.quick else "")
    report = {"what": "final pooled and per-task validation metric vs training FLOPs (kept + discarded), one run each",
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "runs": [],
              "setup": {"config": os.path.relpath(a.config, REPO) if a.config.startswith(REPO) else a.config,
                        **{k: getattr(a, k) for k in ("overrides", "methods", "seeds", "budgets", "sft_epochs",
                                                      "patience", "quick")}}}
    for label, overrides in plan_runs(a):
        x = run_one(a.config, a.workdir, label, [*overrides, *a.overrides])
        report["runs"].append(x)
        print(f"{label:>16}: pooled {x['metric']} {x['pooled_metric']:.4f}, train {x['train_flops'] / 1e9:.0f} GFLOP "
              f"(discarded {x['discarded_flops'] / 1e9:.0f}), {x['wall_seconds']:.0f} s", flush=True)
        if a.budgets and any(r["method"] == "sft" for r in report["runs"]):
            report["comparison"] = {str(s): compare([r for r in report["runs"] if r["label"].endswith(f"_s{s}")])
                                    for s in a.seeds} if a.seeds else {"all": compare(report["runs"])}
        write_outputs(a.out, stem, report, markdown(report), quiet=True)
    print("\n".join(markdown(report)))
    return report


if __name__ == "__main__":
    main()
