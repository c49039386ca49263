"""The text of the reports: `report.md` of one run, the table `compare` prints for several, and
the compute summary shared with the console."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from msft_fast.report.files import CURVES_FILE
from msft_fast.report.formatting import _epoch, _int, _num, _pct, format_flops, format_seconds
from msft_fast.report.load import _best_pooled, _diff, _float, _Run, load_run

# history.json `compute_bound.stop_reason` in words (the mSFT controller's STOP_REASONS, kept here so
# that reports never import training code).
STOP_TEXT = {
    "no_active_task": "every task was excluded",
    "max_stages": "msft.max_stages roll-outs were done",
    "max_epochs": "the compute bound msft.max_epochs was reached",
    "max_stale_stages": "msft.max_stale_stages stages in a row found no better pooled evaluation",
}


def describe_compute(history: "dict | _Run") -> str:
    """Training compute, what the final model keeps of it, and what was discarded: the same words
    in the console, report.md and `compare`."""
    run = history if isinstance(history, _Run) else _Run(history)
    c = run.compute()
    train, ev, kept, disc, rolled = c["train"], c["eval"], c["kept"], c["discarded"], c["rolled_back"]
    if kept is not None and train:
        text = (f"train {format_flops(train)}: {format_flops(kept)} ({_pct(kept, train)}) kept in the final model, "
                f"{format_flops(disc)} ({_pct(disc, train)}) discarded")
        if rolled:
            text += f", of which {format_flops(rolled)} rolled back by roll-backs"
        lookahead = run.total("lookahead_flops")
        if lookahead:
            text += f", of which {format_flops(lookahead)} in undone look-ahead steps"
    else:
        so_far = " so far" if run.totals is None else ""
        text = f"train {format_flops(train)}{so_far}"
        if rolled:
            share = f", {_pct(rolled, train)}" if train else ""
            text += f" ({format_flops(rolled)} of it rolled back by roll-backs{share})"
    text += f"; eval {format_flops(ev)}"
    if train is not None and ev is not None:
        text += f"; total {format_flops(train + ev)}"
    return text


def render_markdown(run: "_Run | dict") -> str:
    if isinstance(run, dict):
        run = _Run(run)
    better = "higher" if run.higher_is_better else "lower"
    lines = [f"# msft-fast run report{': ' + run.name if run.name else ''}", ""]
    if run.status == "finished":
        lines.append("- status: finished")
    else:
        lines.append(f"- status: {run.status} (this report covers the {len(run.evals)} evaluations so far)")
    lines.append(f"- method: {run.method}")
    lines.append(f"- tasks ({len(run.tasks)}): {', '.join(run.tasks) if run.tasks else '-'}")
    lines.append(f"- metric: {run.metric} ({better} is better)")
    for key in ("model", "world_size"):
        if run.h.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {run.h[key]}")
    fe = run.final_eval
    if run.final:
        where = ""
        if fe:
            where = f" (stage {fe.get('stage', '-')}, epoch {_epoch(fe.get('epoch'))}, step {_int(fe.get('step'))})"
        extra = ""
        for other in ("val_loss", "val_exact_match"):
            if run.metric != other and run.final.get(f"pooled_{other}") is not None:
                extra += f", pooled {other} {_num(run.final.get(f'pooled_{other}'))}"
        lines.append(f"- final: eval {run.final.get('eval_id', '-')}{where}: "
                     f"pooled {run.metric} {_num(run.pooled(run.final))}{extra}")
    else:
        best = _best_pooled(run)
        if best is not None:
            lines.append(f"- final: not chosen yet; best pooled {run.metric} so far "
                         f"{_num(run.pooled(best))} at eval {best.get('eval_id')}")
        else:
            lines.append("- final: not chosen yet")
    n_stages = len({e.get("stage") for e in run.evals} | {s.get("stage") for s in run.stages})
    lines.append(f"- evaluations: {len(run.evals)} in {n_stages} stage(s), "
                 f"{len(run.discarded)} of them on rolled-back (discarded) states")

    lines.append(f"- compute: {describe_compute(run)}")
    bound = run.h.get("compute_bound") if isinstance(run.h.get("compute_bound"), dict) else None
    epochs = _float((run.totals or {}).get("epochs_trained"))
    if epochs is not None or bound:
        text = f"- epochs trained over all stages (kept and discarded): {_epoch(epochs)}"
        if bound:
            limit = _float(bound.get("max_epochs"))
            text += (" (no bound: msft.max_epochs=inf)" if limit is None or math.isinf(limit)
                     else f" (bound: msft.max_epochs {_epoch(limit)})")
            if bound.get("stop_reason"):
                text += f"; the loop stopped because {STOP_TEXT.get(bound['stop_reason'], bound['stop_reason'])}"
        lines.append(text)
    for key, label in (("sro", "SRO"), ("ies", "IES"), ("dynamix", "DynamixSFT")):
        section = run.h.get(key)
        if isinstance(section, dict):
            lines.append(f"- {label}: {section.get('summary', '-')}")
    if run.totals and run.totals.get("trained_tokens") is not None:
        lines.append(f"- trained tokens: {_int(run.totals.get('trained_tokens'))}")
    lines.append(f"- wall time: {_wall_split(run.totals)}")
    lines += ["", f"![per-task validation curves]({CURVES_FILE})", ""]

    lines += ["## Stages", ""]
    rows = [run.stage_row(i, s) for i, s in enumerate(run.stages)]
    has_phase = any(r["phase"] for r in rows)
    has_eval = any(r["eval_flops"] is not None for r in rows)
    header = ["stage"] + (["phase"] if has_phase else []) + [
        "excluded", "peak epoch", "rolled back to eval", "steps kept", "steps rolled back",
        "train FLOPs", "rolled back FLOPs"] + (["eval FLOPs"] if has_eval else [])
    body, notes = [], []
    for i, r in enumerate(rows):
        steps_disc, disc = r["steps_discarded"], r["discarded_flops"]
        into_final = run.final_in_rollback(i, run.stages[i])
        if into_final is not None:  # counted once: kept in the final model, not rolled back
            steps_disc, disc = _diff(_float(steps_disc), into_final[0]), _diff(_float(disc), into_final[1])
            notes.append(f"Stage {r['stage']}: the final model (eval {fe.get('eval_id')}) is a state this stage "
                         f"rolled back from, so the {_int(into_final[0])} step(s) and {format_flops(into_final[1])} "
                         f"that lead to it count as kept, not rolled back.")
        body.append([str(r["stage"])] + ([r["phase"] or "-"] if has_phase else []) + [
            r["excluded"] or "none", _epoch(r["peak_epoch"]),
            "-" if r["rollback_to_eval"] is None else str(r["rollback_to_eval"]),
            _int(r["steps_kept"]), _int(steps_disc),
            format_flops(r["train_flops"]), format_flops(disc)]
            + ([format_flops(r["eval_flops"])] if has_eval else []))
    open_stage = run.open_stage()
    if open_stage is not None:
        ids = run.stage_eval_ids(open_stage)
        first, last = run.by_id[ids[0]], run.by_id[ids[-1]]
        prev_end = run.stage_end(run.stages[-1]) if run.stages else None
        before = run._field(prev_end, "train_flops") if run.stages else 0.0
        body.append([f"{open_stage} (in progress)"] + (["-"] if has_phase else []) + [
            "-", "-", "-", _int(_diff(_float(last.get("step")), _float(first.get("step")))), "-",
            format_flops(_diff(_float(last.get("train_flops")), before)), "-"] + (["-"] if has_eval else []))
    if body:
        lines += [_table(header, body), ""]
        lines += ["Peak epoch: the epoch of the excluded task's best evaluation (mSFT rolls back to it; SRO's "
                  "second pass excludes the task there). Steps kept: from the stage's first evaluation to that "
                  "point; rolled back: after it.", ""] + [n for note in notes for n in (note, "")]
    else:
        lines += ["No stage recorded yet.", ""]

    target = fe if fe else (run.evals[-1] if run.evals else None)
    if target is None:
        lines += ["## Per-task metrics", "", "No evaluation yet.", ""]
    else:
        title = "Final per-task metrics" if fe else "Per-task metrics at the latest evaluation"
        lines += [f"## {title} (eval {target.get('eval_id')}, epoch {_epoch(target.get('epoch'))})", ""]
        custom = run.metric not in ("val_loss", "val_token_acc", "val_exact_match")
        answers = run.has_exact_match
        excluded = run.excluded_in()
        header = ["task", "active", "excluded in stage", "val_loss", "val_token_acc"] + \
                 (["val_exact_match", "answers"] if answers else []) + ([run.metric] if custom else []) + ["val_tokens"]
        body = []
        for t in run.tasks:
            rec = (target.get("tasks") or {}).get(t) or {}
            body.append([t, "yes" if rec.get("active", True) and rec else ("no" if rec else "-"),
                         str(excluded[t]) if t in excluded else "-",
                         _num(rec.get("val_loss")), _num(rec.get("val_token_acc"))]
                        + ([_num(rec.get("val_exact_match")), _int(rec.get("val_answers"))] if answers else [])
                        + ([_num(rec.get("metric"))] if custom else []) + [_int(rec.get("val_tokens"))])
        lines += [_table(header, body), ""]
    return "\n".join(lines)


def _wall_split(totals: Optional[dict]) -> str:
    if not totals or _float(totals.get("wall_seconds")) is None:
        return "-"
    wall = _float(totals["wall_seconds"])
    parts, known = [], 0.0
    for key in ("train_seconds", "eval_seconds", "snapshot_seconds", "restore_seconds"):
        v = _float(totals.get(key))
        if v is None:
            continue
        known += v
        share = f" ({100 * v / wall:.1f}%)" if wall else ""
        parts.append(f"{key.removesuffix('_seconds')} {format_seconds(v)}{share}")
    if not parts:
        return format_seconds(wall)
    rest = wall - known
    share = f" ({100 * rest / wall:.1f}%)" if wall else ""
    parts.append(f"other {format_seconds(max(rest, 0.0))}{share}")
    return f"{format_seconds(wall)} = " + " + ".join(parts)


def compare(dirs: Sequence[str]) -> str:
    """A markdown table with one row per run folder: method, final pooled metric, each task's final
    val_loss, FLOPs (train; of it, kept in the final model and discarded; eval; total = train + eval)
    and wall seconds. A run still running shows '(running)' after its method. When a run scored
    generated answers, the final pooled val_loss and val_exact_match and each task's exact match
    are shown too, whatever metric selected the final model."""
    runs = [load_run(d) for d in dirs]
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r.tasks if t not in tasks]
    metrics = {r.metric for r in runs}
    same_metric = len(metrics) == 1
    pooled_head = f"final pooled {next(iter(metrics))}" if same_metric else "final pooled metric"
    answers = any(r.has_exact_match for r in runs)
    both = ["pooled val_loss", "pooled val_exact_match"] if answers else []
    header = ["run", "method", pooled_head] + both + [f"{t} val_loss" for t in tasks] + \
        ([f"{t} exact match" for t in tasks] if answers else []) + [
        "train FLOPs", "kept in final", "discarded", "eval FLOPs", "total FLOPs", "wall s"]
    rows = []
    for r in runs:
        fe = r.final_eval
        pooled = _num(r.pooled(r.final)) if r.final else "-"
        if not same_metric and pooled != "-":
            pooled += f" ({r.metric})"
        per_task = [_num(r.task_value(fe, t, "val_loss")) if fe else "-" for t in tasks]
        if answers:
            pooled = [pooled] + [_num(fe.get(f"pooled_{m}")) if fe else "-" for m in ("val_loss", "val_exact_match")]
            per_task += [_num(r.task_value(fe, t, "val_exact_match")) if fe else "-" for t in tasks]
        else:
            pooled = [pooled]
        totals = r.totals or {}
        c = r.compute() if r.totals is not None else dict.fromkeys(("train", "eval", "kept", "discarded"))
        train, ev = c["train"], c["eval"]
        total = train + ev if train is not None and ev is not None else None
        disc = format_flops(c["discarded"]) + (f" ({_pct(c['discarded'], train)})" if c["discarded"] and train else "")
        method = r.method + ("" if r.status == "finished" else f" ({r.status})")
        rows.append([r.name, method, *pooled] + per_task + [
            format_flops(train), format_flops(c["kept"]), disc, format_flops(ev), format_flops(total),
            _num(totals.get("wall_seconds"), ".1f")])
    return _table(header, rows)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
