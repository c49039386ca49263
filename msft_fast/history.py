"""`history.json`: every evaluation, every stage decision, the final choice and the totals.

Rewritten atomically after every evaluation, so it always describes the run so far. Field names
are a contract (README "Outputs").
"""
from __future__ import annotations

import os
from typing import Any, Optional

from msft_fast.atomic_io import write_json_atomic

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

    @property
    def evals(self) -> list[dict]:
        return self.data["evals"]

    def add_eval(self, record: dict) -> dict:
        record = {"eval_id": len(self.evals), **record}
        self.evals.append(record)
        return record

    def add_stage(self, stage: int, excluded: Optional[str], rollback_to_eval: Optional[int], **extra: Any) -> None:
        self.data["stages"].append({"stage": stage, "excluded": excluded, "rollback_to_eval": rollback_to_eval, **extra})

    def finish(self, final: dict, totals: dict) -> None:
        self.data["final"] = final
        self.data["totals"] = totals
        self.data["status"] = "finished"

    def write(self, is_main: bool) -> None:
        if is_main:
            write_json_atomic(self.path, self.data)
