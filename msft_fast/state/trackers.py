"""Experiment trackers (`train.report_to`): TensorBoard and Weights & Biases, fed by rank 0 with what
metrics.jsonl and history.json record: every logged step, every evaluation (per task), each stage
decision (exclusion, roll-back) and the final summary.

The trainer and History call one fan-out (`Trackers`); each tracker maps the same records onto its
own API. The x axis is `steps_trained`, the optimizer steps ever taken, which keeps growing through
mSFT's roll-backs (`step`, the steps behind the current weights, is logged as a value).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Any, Optional

from msft_fast.errors import ConfigError

log = logging.getLogger("msft_fast")

TRACKERS = ("tensorboard", "wandb")  # the values of train.report_to, each the name of its pip extra
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the package each one needs
TENSORBOARD_DIR = "tensorboard"  # inside output_dir
WANDB_PROJECT = "msft-fast"  # unless WANDB_PROJECT says otherwise


def check_installed(names: list[str]) -> None:
    """Each tracker asked for can be imported; otherwise one sentence naming the extra to install."""
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"config key 'train.report_to' lists {name}, but the {_MODULES[name]} package is not "
                              f"installed: pip install 'msft-fast[{name}]'")


class Trackers:
    """The fan-out. A tracker that fails (a full disk, a lost connection) is dropped with one warning;
    the run goes on, since metrics.jsonl and history.json still hold everything."""

    def __init__(self, trackers: Optional[list] = None):
        self.trackers = list(trackers or [])

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_step(self, record: dict) -> None:
        """A metrics.jsonl record of one optimizer step."""
        self._each("log_step", record["steps_trained"], step_scalars(record))

    def log_eval(self, record: dict) -> None:
        """A history.json evaluation record."""
        self._each("log_eval", record["steps_trained"], eval_scalars(record))

    def log_stage(self, record: dict, steps_trained: int) -> None:
        """A history.json stage record (a method's decision), at the step where the stage ended."""
        scalars = {f"stages/{k}": float(v) for k, v in _numbers(record, skip=("stage",))}
        scalars["stages/stage"] = float(record["stage"])
        scalars["stages/excluded_a_task"] = float(record.get("excluded") is not None)
        self._each("log_stage", steps_trained, scalars, describe_stage(record))

    def log_final(self, history: dict, steps_trained: int) -> None:
        """The run's end: the final choice and the totals, and the report."""
        scalars = {f"final/{k}": float(v) for k, v in _numbers(history.get("final") or {})}
        scalars.update({f"totals/{k}": float(v) for k, v in _numbers(history.get("totals") or {})})
        from msft_fast.report import render_markdown

        self._each("log_final", steps_trained, scalars, render_markdown(history))

    def close(self, failed: bool = False) -> None:
        self._each("close", failed)
        self.trackers = []

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # the run must not die for its dashboard
                log.warning("%s: %s failed (%s: %s); it gets no more metrics from this run", tracker.name, method,
                            type(e).__name__, e)
                self.trackers.remove(tracker)


def open_trackers(names: list[str], output_dir: str, config: dict, state: dict, resumed_step: int) -> Trackers:
    """The trackers of train.report_to, on rank 0 only (others get an empty fan-out).

    state: history.json `trackers`, where a tracker keeps what a resumed run needs to continue the
    same record (the W&B run id); resumed_step: steps_trained at the checkpoint resumed from (0 for
    a fresh run): TensorBoard hides what an earlier attempt logged after it, since it is logged again.
    """
    opened = Trackers()
    for name in names:
        try:
            if name == "tensorboard":
                opened.trackers.append(TensorBoardTracker(os.path.join(output_dir, TENSORBOARD_DIR), config,
                                                          resumed_step))
            elif name == "wandb":
                opened.trackers.append(WandbTracker(output_dir, config, state))
        except Exception as e:  # no W&B login, an unwritable folder: before training, as one sentence
            opened.close(failed=True)
            hint = ("; log in with `wandb login` (or WANDB_API_KEY), or log offline with WANDB_MODE=offline"
                    if name == "wandb" else "")
            raise ConfigError(f"config key 'train.report_to': {name} could not start ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}){hint}") from None
    return opened


# ---------------------------------------------------------------------------------------------
# Records -> scalar names. The per-task curves are `train_tasks/<task>/...` and `eval_tasks/<task>/...`.


def step_scalars(record: dict) -> dict[str, float]:
    out = {f"train/{k}": float(v) for k, v in _numbers({k: v for k, v in record.items() if k != "tasks"})}
    for task, values in (record.get("tasks") or {}).items():
        out.update({f"train_tasks/{task}/{k}": float(v) for k, v in _numbers(values)})
    return out


def eval_scalars(record: dict) -> dict[str, float]:
    out = {f"eval/{k}": float(v) for k, v in _numbers({k: v for k, v in record.items() if k != "tasks"})}
    for task, values in (record.get("tasks") or {}).items():
        out.update({f"eval_tasks/{task}/{k}": float(v) for k, v in _numbers(values)})
    return out


def _numbers(d: dict, prefix: str = "", skip: tuple = ()) -> list[tuple[str, float]]:
    """Numeric leaves (bools as 0/1) of a nested record as (slash/separated/key, value); NaN stays."""
    out = []
    for k, v in d.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            out += _numbers(v, f"{prefix}{k}/")
        elif isinstance(v, (bool, int, float)) and not (isinstance(v, float) and math.isinf(v)):
            out.append((f"{prefix}{k}", float(v)))
    return out


def describe_stage(record: dict) -> str:
    """One line per stage decision, as the console says it (shorter)."""
    phase = f" ({record['phase']})" if record.get("phase") else ""
    head = f"stage {record['stage']}{phase}"
    if record.get("excluded") is None:
        return f"{head}: nothing excluded; evals {record.get('start_eval')}-{record.get('end_eval')}"
    text = f"{head}: excluded '{record['excluded']}'"
    peak = (record.get("peak_evals") or {}).get(record["excluded"])
    if peak is not None:
        text += f" (its best: eval {peak})"
    if record.get("rollback_to_eval") is not None:
        from msft_fast.report import format_flops

        text += (f"; rolled back to eval {record['rollback_to_eval']}: {record.get('steps_discarded', 0)} step(s), "
                 f"{format_flops(record.get('discarded_flops', 0))} discarded")
    return text


# ---------------------------------------------------------------------------------------------
# The trackers


class TensorBoardTracker:
    """Event files in output_dir/tensorboard (`tensorboard --logdir runs/`). The Custom Scalars tab
    overlays the tasks' curves, one chart per value; the Text tab holds the config, each stage
    decision and the final report."""

    name = "tensorboard"

    def __init__(self, log_dir: str, config: dict, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, purge_step=resumed_step + 1 if resumed_step else None)
        self.layout_done = False
        if not resumed_step:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def _scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        self._scalars(step, scalars)

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        if not self.layout_done:  # one chart per value, a line per task
            values = sorted({t.rsplit("/", 1)[1] for t in scalars if t.startswith("eval_tasks/")})
            self.writer.add_custom_scalars({
                "per-task validation": {v: ["Multiline", [f"^eval_tasks/[^/]+/{v}$"]] for v in values},
                "per-task training": {v: ["Multiline", [f"^train_tasks/[^/]+/{v}$"]] for v in ("loss", "token_acc")},
            })
            self.layout_done = True
        self._scalars(step, scalars)
        self.writer.flush()

    def log_stage(self, step: int, scalars: dict[str, float], text: str) -> None:
        self._scalars(step, scalars)
        self.writer.add_text("stages", text, step)
        self.writer.flush()

    def log_final(self, step: int, scalars: dict[str, float], report: str) -> None:
        self._scalars(step, scalars)
        self.writer.add_text("report", report, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in output_dir/wandb. Project, entity, name, tags and mode come from W&B's own
    environment variables (WANDB_PROJECT, default msft-fast; WANDB_MODE=offline to log without a
    network, then `wandb sync`); the run's name defaults to the output folder's. A resumed run
    continues the same W&B run (its id is kept in history.json `trackers.wandb`)."""

    name = "wandb"

    def __init__(self, output_dir: str, config: dict, state: dict):
        import wandb

        saved = state.get("wandb") or {}
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
            name=os.environ.get("WANDB_NAME") or os.path.basename(os.path.normpath(output_dir)),
            dir=output_dir, config=config,
            **({"id": saved["id"], "resume": "allow"} if saved.get("id") else {}),
        )
        self.run.define_metric("steps_trained")
        self.run.define_metric("*", step_metric="steps_trained")
        state["wandb"] = {"id": self.run.id, "project": self.run.project, "mode": _wandb_mode(self.run),
                          "url": getattr(self.run, "url", None)}
        self.stages: list[list] = []

    def _log(self, step: int, scalars: dict[str, Any]) -> None:
        self.run.log({**scalars, "steps_trained": step})

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        self._log(step, scalars)

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        self._log(step, scalars)

    def log_stage(self, step: int, scalars: dict[str, float], text: str) -> None:
        import wandb

        self.stages.append([step, text])
        self._log(step, {**scalars, "stages/decisions": wandb.Table(columns=["steps_trained", "decision"],
                                                                      data=self.stages)})

    def log_final(self, step: int, scalars: dict[str, float], report: str) -> None:
        self.run.summary.update(scalars)
        self.run.summary["report"] = report

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _wandb_mode(run: Any) -> str:
    settings = getattr(run, "settings", None)
    return "offline" if getattr(settings, "_offline", False) or os.environ.get("WANDB_MODE") == "offline" else "online"
