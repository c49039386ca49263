"""`history.json`: every evaluation, every stage decision, the final choice and the totals.

Rewritten atomically after every evaluation, so it always describes the run so far. Field names
are a contract (docs/outputs.md).
"""
from __future__ import annotations

import os
from typing import Any, Optional

from msft_fast.state.atomic_io import write_json_atomic
from msft_fast.state.trackers import Trackers

HISTORY_FILE = "history.json"
FORMAT_VERSION = 1


class History:
    def __init__(self, output_dir: str, method: str, tasks: list[str], config: dict, extra: dict[str, Any]):
        self.path = os.path.join(output_dir, HISTORY_FILE)
        self.data: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "status": "running",
            "method": method,
            "tasks": list(tasks),
            "evals": [],
            "stages": [],
            "final": None,
            "totals": None,
            **extra,
            "config": config,
        }
        self.trackers = Trackers()  # train.report_to: every evaluation, stage and the end are passed on

    @property
    def evals(self) -> list[dict]:
        return self.data["evals"]

    def add_eval(self, record: dict) -> dict:
        record = {"eval_id": len(self.evals), **record}
        self.evals.append(record)
        self.trackers.log_eval(record)
        return record

    def add_stage(self, stage: int, excluded: Optional[str], rollback_to_eval: Optional[int], **extra: Any) -> None:
        record = {"stage": stage, "excluded": excluded, "rollback_to_eval": rollback_to_eval, **extra}
        self.data["stages"].append(record)
        self.trackers.log_stage(record, self._steps_trained(record.get("end_eval")))

    def finish(self, final: dict, totals: dict) -> None:
        self.data["final"] = final
        self.data["totals"] = totals
        self.data["status"] = "finished"
        self.trackers.log_final(self.data, self._steps_trained(None))

    def _steps_trained(self, eval_id: Optional[int]) -> int:
        """Optimizer steps ever taken at evaluation `eval_id` (None: the last), the trackers' x axis."""
        if not self.evals:
            return 0
        record = self.evals[eval_id] if eval_id is not None and 0 <= eval_id < len(self.evals) else self.evals[-1]
        return int(record.get("steps_trained", record.get("step", 0)))

    def write(self, is_main: bool) -> None:
        if is_main:
            write_json_atomic(self.path, self.data)
