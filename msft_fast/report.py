"""Reports built from a run's `history.json` alone: per-task validation curves (`curves.png`), a
summary with the stage table (`report.md`), and a table comparing several runs.

No training code is imported here, and matplotlib only inside `write_curves`, so importing this
module is cheap and a report can be made on any machine that has the output folder. The figure is
drawn on a `matplotlib.figure.Figure` rendered by the Agg backend, without pyplot: nothing global
(the interactive backend, pyplot's figure registry) is touched.

Reading of the history (field names: README "Outputs"):
- The validation metric is `history["metric"]` (default `val_loss`): `val_loss`, `val_token_acc`
  and `val_exact_match` are read from each task's record of the same name; any other metric (a
  `module:function` callback) from the task's `metric` field. The pooled metric of an evaluation is
  its `pooled_metric`, or `pooled_val_loss` when the metric is the loss. Runs that score generated
  answers (`val_exact_match`, or `msft.report_exact_match`) show exact match beside the loss.
- A stage with `rollback_to_eval = r` discards the evaluations after `r` up to its `end_eval`
  (default: its last evaluation): the state they measured was thrown away by the roll-back.
- `train_flops` of an evaluation counts all training compute spent so far, the discarded part
  included; a stage's discarded FLOPs default to `train_flops[end_eval] - train_flops[r]`.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Optional, Sequence

from msft_fast.atomic_io import write_file_atomic
from msft_fast.errors import OutputError

HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
# history.json `compute_bound.stop_reason` in words (the mSFT controller's STOP_REASONS, kept here so
# that reports never import training code).
STOP_TEXT = {
    "no_active_task": "every task was excluded",
    "max_stages": "msft.max_stages roll-outs were done",
    "max_epochs": "the compute bound msft.max_epochs was reached",
    "max_stale_stages": "msft.max_stale_stages stages in a row found no better pooled evaluation",
}
REPORT_FILE = "report.md"

FIG_SIZE_PX = (1400, 600)
_DPI = 100


# ----------------------------------------------------------------------------------------------
# reading


def load_history(output_dir: str) -> dict:
    """The parsed `history.json` of `output_dir`; OutputError (one sentence naming the file) when
    it is missing, unreadable or not a history."""
    path = os.path.join(output_dir, HISTORY_FILE)
    if not os.path.isfile(path):
        raise OutputError(f"{path} does not exist, so there is no run history to report on "
                          f"(is {output_dir} an msft-fast output folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise OutputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise OutputError(f"cannot read {path} ({reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("evals"), list):
        raise OutputError(f"{path} is not an msft-fast history (it has no 'evals' list)")
    return data


class _Run:
    """Derived views of one history: metric, evaluations by id, discarded evaluations, stages."""

    def __init__(self, history: dict, name: str = ""):
        self.h = history
        self.name = name
        self.method = str(history.get("method") or "?")
        self.status = str(history.get("status") or "?")
        self.evals: list[dict] = sorted((e for e in history.get("evals") or [] if isinstance(e, dict)),
                                        key=lambda e: e.get("eval_id", 0))
        self.by_id: dict[int, dict] = {e["eval_id"]: e for e in self.evals if "eval_id" in e}
        tasks = list(history.get("tasks") or [])
        for e in self.evals:  # tasks only seen in evaluations, in order of appearance
            for t in (e.get("tasks") or {}):
                if t not in tasks:
                    tasks.append(t)
        self.tasks: list[str] = tasks
        metric = history.get("metric") or "val_loss"
        hib = history.get("higher_is_better")
        if isinstance(metric, dict):  # tolerate {"name": ..., "higher_is_better": ...}
            hib = metric.get("higher_is_better", hib)
            metric = metric.get("name") or "val_loss"
        self.metric: str = str(metric)
        self.higher_is_better: bool = bool(hib) if hib is not None else self.metric != "val_loss"
        self.stages: list[dict] = [s for s in history.get("stages") or [] if isinstance(s, dict)]
        self.final: Optional[dict] = history.get("final") if isinstance(history.get("final"), dict) else None
        self.totals: Optional[dict] = history.get("totals") if isinstance(history.get("totals"), dict) else None
        self.discarded: set[int] = set()
        for s in self.stages:
            r, end = s.get("rollback_to_eval"), self.stage_end(s)
            if r is not None and end is not None:
                self.discarded.update(i for i in self.by_id if r < i <= end)
        # SRO's first pass (the probe) when a second pass ran after it from the same start: the
        # two passes are drawn as two curves, never joined.
        self.probe: Optional[tuple[int, int]] = None  # (start_eval, end_eval) of the probe
        self.probe_ids: set[int] = set()
        probe = next((s for s in self.stages if s.get("phase") == "probe"), None)
        if probe is not None:
            start, end = self.stage_start(probe), self.stage_end(probe)
            if start is not None and end is not None and any(i > end for i in self.by_id):
                self.probe = (start, end)
                self.probe_ids = {i for i in self.by_id if start < i <= end}

    # --- evaluations ---------------------------------------------------------------------------

    def task_value(self, e: dict, task: str, metric: Optional[str] = None) -> Optional[float]:
        rec = (e.get("tasks") or {}).get(task)
        if not isinstance(rec, dict):
            return None
        metric = metric or self.metric
        if metric in ("val_loss", "val_token_acc", "val_exact_match"):
            v = rec.get(metric)
        else:
            v = rec.get("metric")
        return _float(v)

    def pooled(self, rec: Optional[dict]) -> Optional[float]:
        """Pooled metric of an evaluation or of `final`."""
        if not rec:
            return None
        v = _float(rec.get("pooled_metric"))
        if v is None and self.metric in ("val_loss", "val_exact_match"):
            v = _float(rec.get(f"pooled_{self.metric}"))
        if v is None and self.metric == "val_token_acc" and "tasks" in rec:
            num = den = 0.0  # token-weighted mean of the per-task accuracies
            for t in rec["tasks"].values():
                acc, n = _float(t.get("val_token_acc")), _float(t.get("val_tokens"))
                if acc is None or not n:
                    num = den = 0.0
                    break
                num, den = num + acc * n, den + n
            v = num / den if den else None
        return v

    @property
    def has_exact_match(self) -> bool:
        """Generated answers were scored (msft.metric=val_exact_match or msft.report_exact_match)."""
        return any("pooled_val_exact_match" in e for e in self.evals)

    def active(self, e: dict, task: str) -> bool:
        rec = (e.get("tasks") or {}).get(task)
        return bool(rec.get("active", True)) if isinstance(rec, dict) else False

    @property
    def final_eval(self) -> Optional[dict]:
        return self.by_id.get(self.final.get("eval_id")) if self.final else None

    # --- stages ----------------------------------------------------------------------------------

    def stage_eval_ids(self, stage: Any) -> list[int]:
        return [e["eval_id"] for e in self.evals if e.get("stage") == stage and "eval_id" in e]

    def stage_end(self, s: dict) -> Optional[int]:
        if s.get("end_eval") is not None:
            return s["end_eval"]
        ids = self.stage_eval_ids(s.get("stage"))
        return max(ids) if ids else None

    def stage_start(self, s: dict) -> Optional[int]:
        """The evaluation of the state a stage starts from: `start_eval`, else the state the stage
        before left (its roll-back target, or its end), else the stage's first evaluation."""
        if s.get("start_eval") is not None:
            return s["start_eval"]
        i = next((k for k, st in enumerate(self.stages) if st is s), 0)
        if i > 0:
            prev = self.stages[i - 1]
            r = prev.get("rollback_to_eval")
            return r if r is not None else self.stage_end(prev)
        ids = self.stage_eval_ids(s.get("stage"))
        return min(ids) if ids else None

    def _field(self, eval_id: Optional[int], key: str) -> Optional[float]:
        e = self.by_id.get(eval_id) if eval_id is not None else None
        return _float(e.get(key)) if e else None

    def stage_row(self, i: int, s: dict) -> dict:
        """The numbers of one stage: recorded fields first, else derived from its evaluations."""
        start, end, r = self.stage_start(s), self.stage_end(s), s.get("rollback_to_eval")
        kept_end = r if r is not None else end
        steps_kept = s.get("steps_kept")
        if steps_kept is None:
            steps_kept = _diff(self._field(kept_end, "step"), self._field(start, "step"))
        steps_disc = s.get("steps_discarded")
        if steps_disc is None:
            steps_disc = _diff(self._field(end, "step"), self._field(r, "step")) if r is not None else 0
        disc = s.get("discarded_flops")
        if disc is None:
            disc = _diff(self._field(end, "train_flops"), self._field(r, "train_flops")) if r is not None else 0.0
        train = s.get("train_flops")
        if train is None:
            prev_end = self.stage_end(self.stages[i - 1]) if i > 0 else None
            before = self._field(prev_end, "train_flops") if i > 0 else 0.0
            train = _diff(self._field(end, "train_flops"), before)
        peak = r
        if peak is None and s.get("excluded") and isinstance(s.get("peak_evals"), dict):
            peak = s["peak_evals"].get(s["excluded"])  # SRO: excluded at its peak in the probe, no roll-back
        return {
            "stage": s.get("stage", i), "phase": s.get("phase"), "excluded": s.get("excluded"),
            "rollback_to_eval": r, "peak_epoch": self._field(peak, "epoch"),
            "steps_kept": steps_kept, "steps_discarded": steps_disc,
            "train_flops": train, "discarded_flops": disc, "eval_flops": s.get("eval_flops"),
        }

    def open_stage(self) -> Optional[Any]:
        """A stage that has evaluations but no record yet (the one a running run is in)."""
        recorded = {s.get("stage") for s in self.stages}
        pending = [e.get("stage") for e in self.evals if e.get("stage") not in recorded]
        return pending[-1] if pending else None

    def branches(self) -> list[tuple[int, int, list[int], str]]:
        """(r, e, evaluations, kind) for each part of the run that the final path does not continue:
        kind "rollback": a stage rolled back to eval r, discarding its evaluations up to e; kind
        "probe": SRO's first pass from r to e, after which the second pass restarted from r."""
        out = [(r, e, own, "rollback") for r, e, own in self.rollbacks()]
        if self.probe is not None:
            out.append((self.probe[0], self.probe[1], sorted(self.probe_ids), "probe"))
        return out

    def rollbacks(self) -> list[tuple[int, int, list[int]]]:
        """(rollback_to_eval r, the stage's end_eval e, the discarded evaluations of its own roll-out
        in order) for every stage whose roll-back discarded something."""
        out = []
        for s in self.stages:
            r, e = s.get("rollback_to_eval"), self.stage_end(s)
            if r is None or e is None or e <= r:
                continue
            span = [i for i in sorted(self.by_id) if r < i <= e]
            own = [i for i in span if self.by_id[i].get("stage") == s.get("stage")]
            out.append((r, e, own or span))
        return out

    def excluded_in(self) -> dict[str, Any]:
        return {s["excluded"]: s.get("stage") for s in self.stages if s.get("excluded")}

    # --- totals ------------------------------------------------------------------------------------

    def total(self, key: str) -> Optional[float]:
        """A total: from `totals`, else (discarded FLOPs) the sum over stages, else, for FLOPs of a
        run without totals, the last evaluation's cumulative count."""
        v = _float((self.totals or {}).get(key))
        if v is not None:
            return v
        if key == "discarded_flops":
            vals = [self.stage_row(i, s)["discarded_flops"] for i, s in enumerate(self.stages)]
            vals = [_float(x) for x in vals]
            return sum(vals) if vals and all(x is not None for x in vals) else (0.0 if not vals else None)
        if key in ("train_flops", "eval_flops") and self.totals is None and self.evals:
            return _float(self.evals[-1].get(key))
        return None


    def compute(self) -> dict[str, Optional[float]]:
        """Training FLOPs split by whether the final model descends from them: `kept` (behind the
        final weights), `discarded` (the rest: rolled back by roll-backs, trained past the final
        state, or SRO's probe), and `rolled_back` (the roll-backs' part of `discarded`; for a run
        without a final model yet, all that roll-backs threw away so far)."""
        train, rolled = self.total("train_flops"), self.total("discarded_flops")
        kept = None
        if self.final:
            kept = _float((self.totals or {}).get("final_kept_train_flops"))
            fe = self.final_eval
            if kept is None and fe is not None:
                kept = _float(fe.get("kept_train_flops"))
                if kept is None and _float(fe.get("train_flops")) is not None:
                    # Histories without the field: the final state's compute less what roll-backs before it threw away.
                    before = [self.stage_row(i, s)["discarded_flops"] for i, s in enumerate(self.stages)
                              if (self.stage_end(s) or 0) < fe["eval_id"]]
                    kept = _float(fe["train_flops"]) - sum(_float(x) or 0.0 for x in before)
        discarded = train - kept if train is not None and kept is not None else None
        if rolled is not None and self.final_eval is not None:
            rolled -= self._rolled_back_into_final()
        return {"train": train, "eval": self.total("eval_flops"), "kept": kept, "discarded": discarded,
                "rolled_back": rolled}

    def _rolled_back_into_final(self) -> float:
        """The final model may be a state that its own stage later rolled back from (it was the best
        pooled evaluation, though not the excluded task's peak): the training from the roll-back
        target up to it is in the final model, so it is not discarded."""
        for i, s in enumerate(self.stages):
            kept = self.final_in_rollback(i, s)
            if kept is not None:
                return kept[1]
        return 0.0

    def final_in_rollback(self, i: int, s: dict) -> Optional[tuple[float, float]]:
        """(steps, training FLOPs) of stage `s`'s roll-back that the final model descends from: the
        training from the roll-back target (or the stage start) up to the final state, when the
        final state lies in the rolled-back branch; None when it does not."""
        fe = self.final_eval
        r, end = s.get("rollback_to_eval"), self.stage_end(s)
        if fe is None or r is None or end is None or not r < fe.get("eval_id", -1) <= end:
            return None
        prev_end = self.stage_end(self.stages[i - 1]) if i > 0 else None
        flops = [v for v in (self._field(r, "train_flops"), self._field(prev_end, "train_flops") if i else 0.0)
                 if v is not None]
        # r is an ancestor of the final state (the stage's start or a later state of its roll-out), so
        # their `step` (steps behind the weights) differ by the steps between them.
        steps = _diff(_float(fe.get("step")), self._field(r, "step"))
        spent = _float(fe.get("train_flops"))
        return (max(0.0, steps) if steps is not None else 0.0,
                max(0.0, spent - max(flops)) if spent is not None and flops else 0.0)


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


def _pct(part: Optional[float], whole: Optional[float]) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.1f}%"


# ----------------------------------------------------------------------------------------------
# formatting

_FLOP_UNITS = [(1.0, "FLOP"), (1e3, "kFLOP"), (1e6, "MFLOP"), (1e9, "GFLOP"), (1e12, "TFLOP"),
               (1e15, "PFLOP"), (1e18, "EFLOP"), (1e21, "ZFLOP")]


def format_flops(x: Any) -> str:
    """`1.23 PFLOP`: three significant digits in the largest unit that keeps the number >= 1."""
    v = _float(x)
    if v is None:
        return "-"
    if v == 0:
        return "0 FLOP"
    scale, unit = _FLOP_UNITS[0]
    for s, u in _FLOP_UNITS:
        if abs(v) >= s * (1 - 5e-4):  # 999.96 TFLOP rounds to 1.00 PFLOP, not "1e+03 TFLOP"
            scale, unit = s, u
    return f"{_sig3(v / scale)} {unit}"


def _flops_axis_unit(max_flops: float) -> tuple[float, str]:
    scale, unit = _FLOP_UNITS[0]
    for s, u in _FLOP_UNITS:
        if max_flops >= s:
            scale, unit = s, u
    return scale, unit


def _sig3(v: float) -> str:
    s = f"{v:#.3g}"  # '#': keep trailing zeros (1.00), then drop a bare trailing point (123.)
    return s if "e" in s else s.rstrip(".")


def format_seconds(x: Any) -> str:
    v = _float(x)
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.1f} s"
    h, rem = divmod(int(round(v)), 3600)
    m, s = divmod(rem, 60)
    return f"{v:.0f} s ({h}:{m:02d}:{s:02d})"


def _num(x: Any, fmt: str = ".4f") -> str:
    v = _float(x)
    return "-" if v is None else format(v, fmt)


def _int(x: Any) -> str:
    v = _float(x)
    return "-" if v is None or math.isnan(v) else str(int(round(v)))


def _epoch(x: Any) -> str:
    v = _float(x)
    return "-" if v is None else f"{v:.4g}"


def _float(x: Any) -> Optional[float]:
    if isinstance(x, bool) or x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or a - b < 0:
        return None
    return a - b


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# writing


def write_text_atomic(path: str, text: str) -> None:
    """Text twin of `atomic_io.write_json_atomic`: a reader never sees a half-written file."""
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _write_atomic(path: str, fill) -> None:
    """`atomic_io.write_file_atomic` (umask permissions), failures as one OutputError sentence."""
    try:
        write_file_atomic(path, fill)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror or e})") from None


def write_report(output_dir: str, history: Optional[dict] = None) -> tuple[str, str]:
    """Write `curves.png` and `report.md` into `output_dir` from its `history.json` (or from
    `history`, when the caller already holds it). Returns (png_path, md_path)."""
    if history is None:
        history = load_history(output_dir)
    run = _Run(history, name=os.path.basename(os.path.normpath(os.path.abspath(output_dir))))
    png = os.path.join(output_dir, CURVES_FILE)
    md = os.path.join(output_dir, REPORT_FILE)
    write_curves(run, png)
    write_text_atomic(md, render_markdown(run))
    return png, md


class PeriodicReport:
    """Rewrites `report.md` and `curves.png` while a run goes on, at most every `interval` seconds.
    Rendering the figure takes about 0.5 s: on a small model that is a sizeable share of a stage
    (bench/results/msft_overhead_cpu.md), on a large one it is nothing. The run writes the report
    at its end regardless, and `msft-fast report DIR` redraws it from history.json at any time."""

    def __init__(self, output_dir: str, interval: float = 60.0):
        self.output_dir, self.interval = output_dir, interval
        self._last = time.monotonic()

    def __call__(self, history: dict) -> None:
        if time.monotonic() - self._last >= self.interval:
            write_report(self.output_dir, history)
            self._last = time.monotonic()


# ----------------------------------------------------------------------------------------------
# report.md


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


def _best_pooled(run: _Run) -> Optional[dict]:
    best, best_v = None, None
    for e in run.evals:
        v = run.pooled(e)
        if v is None or math.isnan(v):
            continue
        if best_v is None or (v > best_v if run.higher_is_better else v < best_v):
            best, best_v = e, v
    return best


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


# ----------------------------------------------------------------------------------------------
# curves.png


def write_curves(run: "_Run | dict", path: str) -> str:
    """Two panels: each task's validation metric against cumulative training FLOPs and against
    epoch. Faded dashed: the task was no longer active; light dotted: evaluations of states that
    a roll-back discarded, then a sparse dotted jump back to the restored state; vertical lines:
    exclusions, at the evaluation rolled back to; stars: the final choice. Solid lines join only
    states trained one from the other. A log axis when the curves span more than tenfold."""
    if isinstance(run, dict):
        run = _Run(run)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(FIG_SIZE_PX[0] / _DPI, FIG_SIZE_PX[1] / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_f, ax_e = fig.subplots(1, 2)
    colors = _task_colors(len(run.tasks))
    max_flops = max((_float(e.get("train_flops")) or 0.0 for e in run.evals), default=0.0)
    scale, unit = _flops_axis_unit(max_flops)

    def xf(e: dict) -> Optional[float]:
        v = _float(e.get("train_flops"))
        return None if v is None else v / scale

    def xe(e: dict) -> Optional[float]:
        return _float(e.get("epoch"))

    fe = run.final_eval
    ms = 3.5 if len(run.evals) <= 60 else (2.0 if len(run.evals) <= 150 else 0.0)  # markers clutter long runs
    log_axis = use_log_axis(run)
    for ax, xof in ((ax_f, xf), (ax_e, xe)):
        restore_x = (lambda r, e: xof(e)) if xof is xf else (lambda r, e: xof(r))
        for t, color in zip(run.tasks, colors):
            _draw_curve(ax, run, lambda e, t=t: run.task_value(e, t), lambda e, t=t: run.active(e, t), xof,
                        restore_x, color, lw=1.8, marker_size=ms)
        _draw_curve(ax, run, run.pooled, lambda e: True, xof, restore_x, "black", lw=1.0, alpha=0.7, marker_size=0)

        # exclusions: one vertical line per evaluation rolled back to, labelled with the task(s)
        marks: dict[float, list[tuple[str, str]]] = {}
        for s in run.stages:
            t = s.get("excluded")
            if not t:
                continue
            at = s.get("rollback_to_eval")
            at = at if at is not None else run.stage_end(s)
            e = run.by_id.get(at)
            if e is None or xof(e) is None:
                continue
            color = colors[run.tasks.index(t)] if t in run.tasks else "grey"
            marks.setdefault(xof(e), []).append((t, color))
            y = run.task_value(e, t)
            if y is not None:
                ax.plot([xof(e)], [y], marker="X", ms=10, color=color, mec="black", mew=0.8, zorder=5,
                        linestyle="none")
        for x, items in marks.items():
            ax.axvline(x, color=items[0][1], lw=1.2, ls=(0, (6, 3)), alpha=0.8, zorder=1)
            ax.text(x, 0.99, " excl. " + ", ".join(t for t, _ in items), transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="right", fontsize=8, color=items[0][1], zorder=7,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=1))
        if fe is not None and xof(fe) is not None:
            for t, color in zip(run.tasks, colors):
                y = run.task_value(fe, t)
                if y is not None:
                    ax.plot([xof(fe)], [y], marker="*", ms=15, color=color, mec="black", mew=0.8, zorder=6,
                            linestyle="none")
            py = run.pooled(fe)
            if py is not None:
                ax.plot([xof(fe)], [py], marker="*", ms=17, color="gold", mec="black", mew=0.9, zorder=6,
                        linestyle="none")
        if log_axis:
            ax.set_yscale("log")
        ax.set_ylabel(f"validation {run.metric} ({'higher' if run.higher_is_better else 'lower'} is better)"
                      + (", log scale" if log_axis else ""))
        ax.grid(True, alpha=0.3)
    ax_f.set_xlabel(f"cumulative training compute ({unit})")
    ax_e.set_xlabel("epoch")
    ax_f.set_title("against training FLOPs (discarded compute included)", fontsize=10)
    ax_e.set_title("against epoch" + (" (a roll-back jumps back)" if run.discarded else "")
                   + (" (SRO: pass 2 restarts at epoch 0)" if run.probe_ids else ""), fontsize=10)

    if run.final:
        head = (f"{run.method}: final pooled {run.metric} {_num(run.pooled(run.final))} "
                f"(eval {run.final.get('eval_id')})")
    else:
        best = _best_pooled(run)
        head = f"{run.method} ({run.status}): " + (
            f"best pooled {run.metric} so far {_num(run.pooled(best))} (eval {best.get('eval_id')})"
            if best else "no evaluation yet")
    fig.suptitle((run.name + " - " if run.name else "") + head, fontsize=13)

    handles = [Line2D([], [], color=c, lw=2, marker="o", ms=4, label=t) for t, c in zip(run.tasks, colors)]
    handles.append(Line2D([], [], color="black", lw=1, alpha=0.7, label=f"pooled {run.metric}"))
    if any(not run.active(e, t) for e in run.evals for t in (e.get("tasks") or {})):
        handles.append(Line2D([], [], color="grey", lw=1.2, ls="--", alpha=0.5, label="task inactive (excluded)"))
    if run.discarded:
        handles.append(Line2D([], [], color="grey", lw=1.2, ls=":", alpha=0.5, label="discarded by roll-back"))
        handles.append(Line2D([], [], color="grey", lw=0.8, ls=(0, (1, 3)), label="roll-back (jump back)"))
    if run.probe_ids:
        handles.append(Line2D([], [], color="grey", lw=1.2, ls="-.", alpha=0.6, label="SRO pass 1 (probe)"))
    if any(s.get("excluded") for s in run.stages):
        handles.append(Line2D([], [], color="grey", lw=1.2, ls=(0, (6, 3)), marker="X", ms=8, mec="black",
                              label="exclusion"))
    if fe is not None:
        handles.append(Line2D([], [], color="gold", lw=0, marker="*", ms=14, mec="black", label="final choice"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9), fontsize=9, frameon=False)

    _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))
    return path


def use_log_axis(run: _Run) -> bool:
    """A log axis when the curves span more than a factor of ten (one task at loss 11 would squash
    the others into the bottom of a linear axis) and every value is positive (losses, not scores
    that reach 0)."""
    values = [v for e in run.evals for t in run.tasks if (v := run.task_value(e, t)) is not None]
    values += [v for e in run.evals if (v := run.pooled(e)) is not None]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _task_colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _draw_curve(ax, run: _Run, value, active, xof, restore_x, color, lw: float, alpha: float = 1.0,
                marker_size: float = 3.5) -> None:
    """One task's (or the pooled) curve on one panel.

    Kept evaluations are joined in eval_id order: solid while the task is active, faded dashed once
    it is not. Each roll-back (a stage with `rollback_to_eval` r and discarded evaluations up to e)
    adds: the discarded branch r -> ... -> e (light dotted), the jump from e back to the restored
    state P (thin, faint), and the kept path resumes from P rather than from r. P has the value of
    r; on the epoch panel it sits at r's epoch, on the FLOPs panel at e's FLOPs (the compute spent
    by then), so `restore_x(r_eval, e_eval)` gives its x.
    """
    def point(e):
        x, y = xof(e), value(e)
        return None if x is None or y is None else (x, y)

    styles = {
        "solid": dict(ls="-", alpha=alpha, lw=lw),
        "inactive": dict(ls="--", alpha=0.45 * alpha, lw=lw * 0.75),
        "discarded": dict(ls=":", alpha=0.4 * alpha, lw=lw * 0.9),
        "probe": dict(ls="-.", alpha=0.45 * alpha, lw=lw * 0.8),
        "jump": dict(ls=(0, (1, 3)), alpha=0.5 * alpha, lw=0.8),  # a roll-back: no training along it
    }
    segments: dict[str, list[list[tuple[float, float]]]] = {k: [] for k in styles}

    def add(style: str, p0, p1) -> None:
        lines = segments[style]
        if lines and lines[-1][-1] == p0:  # extend a polyline of the same style
            lines[-1].append(p1)
        else:
            lines.append([p0, p1])

    restores: dict[int, tuple[float, float]] = {}  # first kept eval after a roll-back -> P
    off_path = run.discarded | run.probe_ids
    for r, e_end, branch, kind in run.branches():
        r_eval, e_eval = run.by_id.get(r), run.by_id.get(e_end)
        pr = point(r_eval) if r_eval else None
        if pr is None:
            continue
        prev = pr
        for i in branch:
            pi = point(run.by_id[i])
            if pi is not None:
                add("discarded" if kind == "rollback" else "probe", prev, pi)
                prev = pi
        px = restore_x(r_eval, e_eval) if e_eval else None
        restore = (px if px is not None else pr[0], pr[1])
        if prev != pr and kind == "rollback":  # SRO's second pass is a new run, not a jump back
            add("jump", prev, restore)
        nxt = next((i for i in sorted(run.by_id) if i > e_end and i not in off_path), None)
        if nxt is not None and (nxt not in restores or restores[nxt][0] < restore[0]):
            restores[nxt] = restore

    kept = [(i, point(run.by_id[i])) for i in sorted(run.by_id) if i not in off_path]
    kept = [(i, p) for i, p in kept if p is not None]
    for (i0, p0), (i1, p1) in zip(kept, kept[1:]):
        add("solid" if active(run.by_id[i1]) else "inactive", restores.get(i1, p0), p1)
    for i1, p1 in kept[:1]:
        if i1 in restores:
            add("solid" if active(run.by_id[i1]) else "inactive", restores[i1], p1)

    for style, lines in segments.items():
        for line in lines:
            xs, ys = zip(*line)
            ax.plot(xs, ys, color=color, zorder=3, **styles[style])
    if marker_size:
        solid, faded = [], []
        for i, e in run.by_id.items():
            p = point(e)
            if p is not None:
                (faded if i in off_path or not active(e) else solid).append(p)
        if solid:
            ax.plot(*zip(*solid), ls="none", marker="o", ms=marker_size, color=color, alpha=alpha, zorder=4)
        if faded:
            ax.plot(*zip(*faded), ls="none", marker="o", ms=marker_size, mfc="none", mec=color,
                    alpha=0.5 * alpha, zorder=4)


# ----------------------------------------------------------------------------------------------
# compare


def compare(dirs: Sequence[str]) -> str:
    """A markdown table with one row per run folder: method, final pooled metric, each task's final
    val_loss, FLOPs (train; of it, kept in the final model and discarded; eval; total = train + eval)
    and wall seconds. A run still running shows '(running)' after its method. When a run scored
    generated answers, the final pooled val_loss and val_exact_match and each task's exact match
    are shown too, whatever metric selected the final model."""
    runs = [_Run(load_history(d), name=os.path.basename(os.path.normpath(os.path.abspath(d)))) for d in dirs]
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
