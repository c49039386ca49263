"""Atomic writes: a reader (or a crash) never sees a half-written file or folder."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any


def write_json_atomic(path: str, obj: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir_atomic(tmp_dir: str, final_dir: str) -> None:
    """Move a fully written `tmp_dir` to `final_dir`, replacing an older one."""
    old = None
    if os.path.exists(final_dir):
        old = final_dir.rstrip("/") + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
