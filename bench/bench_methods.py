"""Every method on the demo at equal settings, over several seeds: SFT, mSFT, SRO, IES and
DynamixSFT from the same warmed-up tiny model, on the same mixture, packing, loss, evaluation and
FLOPs accounting, so a difference is the method's. For each run: the final pooled and per-task
validation loss and the training FLOPs (of them, discarded by roll-backs or look-aheads).

Runs the real trainer in this process, one run after another (the demo workspace as `make demo`
makes it, in --workdir). Writes bench/results/methods_<device>.json and .md, rewritten after every
run so that an interrupted bench keeps what it measured.

    python bench/bench_methods.py [--config configs/demo.yaml] [--seeds 0 1 2]
                                  [--methods sft msft sro ies dynamix] [key.path=value ...]
    python bench/bench_methods.py --merge A.json B.json    # one table from several processes' reports
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_budget import BASELINES, run_one
from bench_msft import DEFAULT_WORKDIR, REPO, machine_info, prepare_demo, source_note, write_outputs

METHODS = {"sft": ["method=sft"], "msft": ["method=msft"],
           **{m: [f"method={m}", *extra] for m, extra in BASELINES.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo.yaml"))
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each repetition")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results do not depend on it)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these reports (one per process) into --out")
    a = p.parse_args(argv)
    if a.merge:
        return render(a.merge, a.workdir, a.out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    logging.getLogger("msft_fast").setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    prepare_demo(a.workdir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "what": "final pooled and per-task validation loss and training FLOPs (kept + discarded) of every "
                "method on the demo, one run per method and seed; final = the evaluation with the best pooled "
                "metric, for every method alike",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "setup": {"config": os.path.relpath(a.config, REPO) if a.config.startswith(REPO) else a.config,
                  "overrides": a.overrides, "seeds": a.seeds, "methods": {m: METHODS[m] for m in a.methods}},
        "runs": [],
    }
    t0 = time.time()
    for seed in a.seeds:
        for m in a.methods:
            r = run_one(a.config, a.workdir, f"{m}_s{seed}", [*METHODS[m], f"train.seed={seed}", *a.overrides])
            r["seed"] = seed
            report["runs"].append(r)
            print(f"{r['label']:>12}: pooled {r['metric']} {r['pooled_metric']:.4f}  train "
                  f"{r['train_flops'] / 1e9:.0f} GFLOP (discarded {r['discarded_flops'] / 1e9:.0f})  "
                  f"{r['wall_seconds']:.0f} s", flush=True)
            report["bench_seconds"] = time.time() - t0
            write_outputs(a.out, f"methods_{device}", report, markdown(report))
    return report


def markdown(r: dict) -> list[str]:
    runs, m = r["runs"], r["machine"]
    methods = list(dict.fromkeys(x["method"] for x in runs))
    tasks = list(runs[0]["tasks"])
    metric = runs[0]["metric"]
    seeds = sorted({x["seed"] for x in runs})
    lines = [f"# Every method on the demo: quality and training FLOPs ({m['device']}, measured)", "",
             f"{r['date']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}, "
             f"{source_note(m)}; config `{r['setup']['config']}` {' '.join(r['setup']['overrides'])}; "
             f"seeds {', '.join(map(str, seeds))} (train.seed: data order and dropout; the warmed-up base model is "
             f"the same); final = the evaluation with the best pooled {metric}, selected on the validation split "
             "it is reported on, for every method alike", "",
             f"Mean over seeds (min - max); lower {metric} is better" if not runs[0]["higher_is_better"]
             else f"Mean over seeds (min - max); higher {metric} is better", "",
             f"| method | seeds | final pooled {metric} | train GFLOP | of which not in the final model | eval GFLOP |",
             "|---|---|---|---|---|---|"]
    for meth in methods:
        xs = [x for x in runs if x["method"] == meth]
        pooled = [x["pooled_metric"] for x in xs]
        train = [x["train_flops"] / 1e9 for x in xs]
        disc = [x["final_discarded_train_flops"] / 1e9 for x in xs]
        ev = [x["eval_flops"] / 1e9 for x in xs]
        lines.append(f"| {meth} | {len(xs)} | {statistics.mean(pooled):.4f} ({min(pooled):.4f} - {max(pooled):.4f}) | "
                     f"{statistics.mean(train):.0f} ({min(train):.0f} - {max(train):.0f}) | "
                     f"{statistics.mean(disc):.0f} | {statistics.mean(ev):.0f} |")
    lines += ["", "Every run:", "",
              f"| run | pooled {metric} | " + " | ".join(tasks) + " | final epoch | train GFLOP (not in the final model) | what the method did | wall s |",
              "|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    for x in runs:
        did = ("excluded " + ", ".join(x["excluded"])) if x["excluded"] else (x.get("method_summary") or "-")
        lines.append(f"| {x['label']} | {x['pooled_metric']:.4f} | "
                     + " | ".join(f"{x['tasks'][n]['val_loss']:.3f}" for n in tasks)
                     + f" | {x['final_epoch']:.2f} | {x['train_flops'] / 1e9:.0f} ({x['final_discarded_train_flops'] / 1e9:.0f}) | {did} | "
                     f"{x['wall_seconds']:.0f} |")
    lines += ["", "Not in the final model: training FLOPs the final weights do not descend from (history.json "
              "`totals.final_discarded_train_flops`): steps after the selected evaluation, mSFT's roll-backs, "
              "SRO's probe run, DynamixSFT's undone look-ahead steps. All of them are in the train column. "
              "FLOPs are counted by the trainer (6N per trained token plus attention, 2N per evaluated token), "
              "not timed; wall seconds depend on what else the machine ran and compare nothing."]
    return lines


def render(paths: list[str], workdir: str, out: str) -> dict:
    """Merge the reports of several bench_methods.py processes (e.g. one per seed) into one, in seed
    then method order; fields a run lacks are read from its history.json in `workdir`."""
    import json

    reports = [json.load(open(p)) for p in paths]
    report = {**reports[0], "runs": sorted((r for rep in reports for r in rep["runs"]),
                                           key=lambda r: (r["seed"], list(METHODS).index(r["label"].rsplit("_s", 1)[0])))}
    report["setup"] = {**reports[0]["setup"], "seeds": sorted({r["seed"] for r in report["runs"]})}
    report["bench_seconds"] = sum(rep.get("bench_seconds", 0) for rep in reports)
    commits = sorted({rep["machine"].get("git_commit", "?") for rep in reports})
    report["machine"] = {**report["machine"], "git_commit": ", ".join(commits)}  # one per process
    for r in report["runs"]:
        if "final_discarded_train_flops" not in r:
            h = json.load(open(os.path.join(workdir, "runs", f"budget_{r['label']}", "history.json")))
            r["final_discarded_train_flops"] = h["totals"]["final_discarded_train_flops"]
    device = report["machine"]["device"]
    write_outputs(out, f"methods_{device}", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
