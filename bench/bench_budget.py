"""Compute saving at a low budget: plain SFT at several epoch counts against mSFT at C in {0.5, 1, 2},
with and without `msft.patience`, and the paper's other baselines (SRO, IES, DynamixSFT) at the
config's epoch count, same model, data and seed. For every run: the final pooled and per-task
validation metric against total training FLOPs (kept + discarded by roll-backs or look-aheads).

Runs the real trainer in this process, one run after another (default: the demo mixture from the
warmed-up tiny model, made in --workdir as `make demo` makes it). Writes
bench/results/budget_<device>.json, .md and .png (quality vs FLOPs, one point per run).

    python bench/bench_budget.py [--config configs/demo.yaml] [--sft-epochs 1 2 3 4] [--budgets 0.5 1 2]
                                 [--patience 1] [--min-delta 0.02] [--seeds 0 1 2] [--name NAME]
                                 [--baselines sro ies dynamix] [key.path=value ...]
    python bench/bench_budget.py --quick    # a tiny mixture, four runs, about 30 s: checks that it runs

Runs that score generated answers (msft.metric=val_exact_match, or msft.report_exact_match=true as
the demo configs set it) report exact match beside the validation loss. --seeds repeats every run
for each train.seed and adds a per-seed summary; --min-delta adds mSFT runs with that msft.min_delta.
"""
from __future__ import annotations

import argparse
import os
import time

from bench_msft import (DEFAULT_WORKDIR, REPO, machine_info, prepare_demo, quick_config, source_note, train_config,
                        write_outputs)


# The baselines beside SFT and mSFT, with the overrides they need on the demo. IES's reference rule
# (window 3, k 1) needs 6 recorded losses per document, i.e. 6 epochs, before it may master one,
# and decides at epoch ends that more training follows: within the demo's 6 epochs it could never
# fire, so the demo runs it with window 1 (4 losses; first decision at the end of epoch 4).
BASELINES = {"sro": [], "ies": ["ies.window=1"], "dynamix": []}


def run_one(config: str, workdir: str, label: str, overrides: list[str]) -> dict:
    t0 = time.time()
    h = train_config(config, workdir, [f"output_dir=runs/budget_{label}", *overrides], log_name="budget.log")
    final = next(e for e in h["evals"] if e["eval_id"] == h["final"]["eval_id"])
    tot = h["totals"]
    return {
        "label": label, "method": h["method"], "overrides": overrides,
        "final_eval_id": final["eval_id"], "final_epoch": final["epoch"], "final_stage": final["stage"],
        "pooled_val_loss": final["pooled_val_loss"], "pooled_val_token_acc": final["pooled_val_token_acc"],
        "pooled_val_exact_match": final.get("pooled_val_exact_match"),  # None: answers not scored
        "pooled_metric": final["pooled_metric"],
        "tasks": {n: {"val_loss": t["val_loss"], "val_token_acc": t["val_token_acc"],
                      "val_exact_match": t.get("val_exact_match")}
                  for n, t in final["tasks"].items()},
        "generated_tokens": tot.get("generated_tokens"), "generation_seconds": tot.get("generation_seconds"),
        "eval_seconds": tot["eval_seconds"],
        "train_flops": tot["train_flops"], "discarded_flops": tot["discarded_flops"], "eval_flops": tot["eval_flops"],
        "trained_tokens": tot["trained_tokens"], "steps": tot["steps"], "wall_seconds": time.time() - t0,
        "excluded": [st["excluded"] for st in h["stages"] if st.get("excluded")],
        "stages": len(h["stages"]), "metric": h["metric"], "higher_is_better": h["higher_is_better"],
        "lookahead_flops": tot.get("lookahead_flops", 0),
        "final_discarded_train_flops": tot["final_discarded_train_flops"],
        "method_summary": (h.get(h["method"]) or {}).get("summary") if isinstance(h.get(h["method"]), dict) else None,
    }


def compare(runs: list[dict]) -> dict:
    """Where each mSFT run stands against the SFT runs: better than the best SFT run that used no more
    training FLOPs (a win at its budget), and against the best SFT run at any budget."""
    sign = -1.0 if runs[0]["higher_is_better"] else 1.0  # cost = sign * metric, lower is better
    sft = [r for r in runs if r["method"] == "sft"]
    best_sft = min(sft, key=lambda r: sign * r["pooled_metric"])
    out = {}
    for r in runs:
        if r["method"] != "msft":
            continue
        cheaper = [s for s in sft if s["train_flops"] <= r["train_flops"]]
        best_cheaper = min(cheaper, key=lambda s: sign * s["pooled_metric"]) if cheaper else None
        # The cheapest SFT run at least as good as this mSFT run: the FLOPs mSFT saves (or costs).
        as_good = [s for s in sft if sign * s["pooled_metric"] <= sign * r["pooled_metric"]]
        cheapest_as_good = min(as_good, key=lambda s: s["train_flops"]) if as_good else None
        out[r["label"]] = {
            # None: no SFT run was that cheap, so there is nothing to beat (not a win).
            "beats_best_sft_with_no_more_flops": (None if best_cheaper is None
                                                  else sign * r["pooled_metric"] < sign * best_cheaper["pooled_metric"]),
            "best_sft_with_no_more_flops": best_cheaper["label"] if best_cheaper else None,
            "pooled_metric_minus_best_sft": r["pooled_metric"] - best_sft["pooled_metric"],
            "flops_over_best_sft": r["train_flops"] / best_sft["train_flops"],
            "cheapest_sft_as_good": cheapest_as_good["label"] if cheapest_as_good else None,
            "tasks_better_than_best_sft": [n for n in r["tasks"]
                                           if sign * _task_metric(r, n) < sign * _task_metric(best_sft, n)],
        }
    return {"best_sft": best_sft["label"], "msft": out}


def _task_metric(run: dict, name: str) -> float:
    metric = run["metric"] if run["metric"] in ("val_token_acc", "val_exact_match") else "val_loss"
    return run["tasks"][name][metric]


def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = runs[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, with_eval in zip(axes, (False, True)):
        x = lambda r: (r["train_flops"] + (r["eval_flops"] if with_eval else 0)) / 1e9  # noqa: E731
        sft = sorted((r for r in runs if r["method"] == "sft"), key=x)
        ax.plot([x(r) for r in sft], [r["pooled_metric"] for r in sft], "o-", color="black", label="SFT (epochs)")
        for r in sft:
            ax.annotate(r["label"].removeprefix("sft_"), (x(r), r["pooled_metric"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        colors = {"0.5": "tab:blue", "1": "tab:orange", "1.0": "tab:orange", "2": "tab:green", "2.0": "tab:green"}
        for r in runs:
            if r["method"] != "msft":
                continue
            c = r["label"].split("_")[1].removeprefix("C")
            patient = "_p" in r["label"]
            ax.plot([x(r)], [r["pooled_metric"]], "s" if patient else "D", color=colors.get(c, "tab:red"),
                    fillstyle="none" if patient else "full", markersize=8, label=r["label"])
        for r in runs:
            if r["method"] not in ("sft", "msft"):
                ax.plot([x(r)], [r["pooled_metric"]], "^", markersize=8, label=r["label"])
        ax.set_xlabel("GFLOP: training incl. discarded" + (" + evaluation" if with_eval else ""))
        ax.set_ylabel(f"final pooled {metric} ({'higher' if runs[0]['higher_is_better'] else 'lower'} is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo.yaml"),
                   help="a run config (method, epochs and budget are overridden); relative paths resolve in --workdir")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")
    p.add_argument("--sft-epochs", type=float, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1, 2], help="mSFT roll-out budgets C")
    p.add_argument("--patience", type=int, default=1, help="the msft.patience of the 'with patience' runs (0: none)")
    p.add_argument("--min-delta", type=float, nargs="*", default=[], help="also mSFT runs with these msft.min_delta")
    p.add_argument("--seeds", type=int, nargs="*", default=[], help="repeat every run for each train.seed")
    p.add_argument("--name", default="", help="a suffix of the output files (budget_<device>_<name>.*)")
    p.add_argument("--baselines", nargs="*", default=None, choices=list(BASELINES),
                   help="other methods, one run each at the config's epoch count (default: all; none with --quick)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results do not depend on it)")
    p.add_argument("--quick", action="store_true", help="a tiny mixture, SFT 1 and 2 epochs, mSFT C=0.5 (+patience)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    logging.getLogger("msft_fast").setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.config, a.sft_epochs, a.budgets = quick_config(a.workdir), [1, 2], [0.5]
        a.baselines = a.baselines or []
    else:
        prepare_demo(a.workdir)
    t0 = time.time()
    plan = [(f"sft_{e:g}ep", ["method=sft", f"train.epochs={e:g}"]) for e in a.sft_epochs]
    for c in a.budgets:
        plan.append((f"msft_C{c:g}", ["method=msft", f"msft.budget_epochs={c:g}", "msft.patience=null"]))
        for d in a.min_delta:
            plan.append((f"msft_C{c:g}_d{d:g}", ["method=msft", f"msft.budget_epochs={c:g}", "msft.patience=null",
                                                 f"msft.min_delta={d:g}"]))
        if a.patience:
            plan.append((f"msft_C{c:g}_p{a.patience}", ["method=msft", f"msft.budget_epochs={c:g}",
                                                         f"msft.patience={a.patience}"]))
    plan += [(m, [f"method={m}", *BASELINES[m]]) for m in (list(BASELINES) if a.baselines is None else a.baselines)]
    if a.seeds:
        plan = [(f"{label}_s{seed}", [*overrides, f"train.seed={seed}"]) for seed in a.seeds for label, overrides in plan]
    runs = []
    for label, overrides in plan:
        runs.append(run_one(a.config, a.workdir, label, [*overrides, *a.overrides]))
        r = runs[-1]
        em = "" if r["pooled_val_exact_match"] is None or r["metric"] == "val_exact_match" \
            else f"  exact match {r['pooled_val_exact_match']:.4f}"
        print(f"{label:>14}: pooled {r['metric']} {r['pooled_metric']:.4f}{em}  train {r['train_flops'] / 1e9:.0f} "
              f"GFLOP (discarded {r['discarded_flops'] / 1e9:.0f})  {r['wall_seconds']:.0f} s", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "what": "final pooled and per-task validation metric vs total training FLOPs (kept + discarded); "
                "SFT at several epoch counts vs mSFT at several budgets C, with and without patience; same seed",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "setup": {"config": os.path.relpath(a.config, REPO) if a.config.startswith(REPO) else a.config,
                  "overrides": a.overrides, "sft_epochs": a.sft_epochs, "budgets": a.budgets,
                  "patience": a.patience, "min_delta": a.min_delta, "seeds": a.seeds, "quick": a.quick},
        "runs": runs,
        "comparison": compare(runs) if not a.seeds else
        {str(seed): compare([r for r in runs if r["label"].endswith(f"_s{seed}")]) for seed in a.seeds},
        "bench_seconds": time.time() - t0,
    }
    stem = f"budget_{device}" + ("_quick" if a.quick else "") + (f"_{a.name}" if a.name else "")
    os.makedirs(a.out, exist_ok=True)
    plot(runs, os.path.join(a.out, stem + ".png"),
         f"{report['setup']['config']} {' '.join(a.overrides)} - {report['date']}, {device}")
    write_outputs(a.out, stem, report, markdown(report))
    return report


def markdown(r: dict) -> list[str]:
    runs, m = r["runs"], r["machine"]
    tasks = list(runs[0]["tasks"])
    metric = runs[0]["metric"]
    answers = runs[0]["pooled_val_exact_match"] is not None  # exact match beside the loss
    extra = [] if not answers else (["pooled val_loss"] if metric != "val_loss" else []) + (
        ["pooled exact match"] if metric != "val_exact_match" else [])
    lines = [f"# Quality vs training FLOPs: SFT epochs vs mSFT budgets ({m['device']})", "",
             f"{r['date']}, {m['cores']} cores, {m.get('torch_threads', '?')} torch thread(s), torch {m['torch']}, "
             f"{source_note(m)}; config `{r['setup']['config']}` {' '.join(r['setup']['overrides'])}; "
             + (f"train.seed {', '.join(map(str, r['setup']['seeds']))} (suffix _sN)" if r["setup"].get("seeds")
                else "seed from the config")
             + f"; final = the evaluation with the best pooled {metric} (selected on the validation split it is "
             "reported on, for every method alike)"
             + ("; exact match = greedy answers equal to the references, pooled over all answers" if answers else ""),
             "",
             f"| run | pooled {metric} | " + "".join(f"{c} | " for c in extra)
             + " | ".join(tasks) + " | train GFLOP (discarded) | eval GFLOP | excluded | wall s |",
             "|---|---|" + "---|" * len(extra) + "---|" * len(tasks) + "---|---|---|---|"]
    comparisons = r["comparison"] if r["setup"].get("seeds") else {"": r["comparison"]}
    best = {c["best_sft"] for c in comparisons.values()}
    for x in runs:
        name = f"**{x['label']}**" if x["label"] in best else x["label"]
        cells = [f"{_task_metric(x, n):.3f}" + (f" / {x['tasks'][n]['val_exact_match']:.3f}"
                                                 if answers and metric != "val_exact_match" else "") for n in tasks]
        head = f"| {name} | {x['pooled_metric']:.4f} | "
        head += "".join(f"{x['pooled_val_loss' if c == 'pooled val_loss' else 'pooled_val_exact_match']:.4f} | "
                        for c in extra)
        lines.append(head + " | ".join(cells) + f" | {x['train_flops'] / 1e9:.0f} ({x['discarded_flops'] / 1e9:.0f}) | "
                     f"{x['eval_flops'] / 1e9:.0f} | {', '.join(x['excluded']) or '-'} | {x['wall_seconds']:.0f} |")
    if answers and metric != "val_exact_match":
        lines += ["", f"Task cells: {metric} / exact match of the final model."]
    for seed, cmp_ in comparisons.items():
        lines += ["", f"Best SFT run{f' (seed {seed})' if seed else ''}: {cmp_['best_sft']}. Against SFT:", ""]
        for label, c in cmp_["msft"].items():
            verdict = {True: "wins", False: "loses", None: "has no SFT run as cheap to compare with, i.e. no verdict,"}[
                c["beats_best_sft_with_no_more_flops"]]
            lines.append(f"- {label}: {verdict} against the best SFT run with no more training FLOPs "
                         f"({c['best_sft_with_no_more_flops'] or 'none that cheap'}); pooled {metric} "
                         f"{c['pooled_metric_minus_best_sft']:+.4f} vs the best SFT at {c['flops_over_best_sft']:.2f}x "
                         f"its FLOPs; the cheapest SFT run as good: {c['cheapest_sft_as_good'] or 'none'}; tasks "
                         f"better than the best SFT: {', '.join(c['tasks_better_than_best_sft']) or 'none'}")
    return lines


if __name__ == "__main__":
    main()
