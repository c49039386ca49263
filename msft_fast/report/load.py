"""One run's `history.json` read into plain data: `load_history` parses the file, `_Run` derives
what the reports show (the metric, evaluations by id, discarded evaluations, stage numbers, compute).

Reading of the history (field names: docs/outputs.md):
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
from typing import Any, Optional

from msft_fast.errors import OutputError
from msft_fast.report.files import HISTORY_FILE


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


def load_run(output_dir: str, history: Optional[dict] = None) -> "_Run":
    """The run of `output_dir`, named after the folder, from its `history.json` (or from `history`,
    when the caller already holds it)."""
    if history is None:
        history = load_history(output_dir)
    return _Run(history, name=os.path.basename(os.path.normpath(os.path.abspath(output_dir))))


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


def _best_pooled(run: _Run) -> Optional[dict]:
    """The evaluation with the best pooled metric so far (NaN skipped); None before the first."""
    best, best_v = None, None
    for e in run.evals:
        v = run.pooled(e)
        if v is None or math.isnan(v):
            continue
        if best_v is None or (v > best_v if run.higher_is_better else v < best_v):
            best, best_v = e, v
    return best


def _float(x: Any) -> Optional[float]:
    """A history value as a float; None when it is missing, a bool or not a number."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a - b for a count that cannot shrink; None when either is unknown or it would be negative."""
    if a is None or b is None or a - b < 0:
        return None
    return a - b
