"""Read back what an offline W&B run wrote: its `run-<id>.wandb` file is a LevelDB-style log (32 KiB
blocks of records with a 7-byte header: crc32, length, type) after a 7-byte `:W&B` header, each
record a `wandb_internal_pb2.Record`. wandb itself has no public reader for it (`wandb sync` uploads)."""
from __future__ import annotations

import glob
import json
import os
import struct
import time

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            return
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_offline_run(wandb_dir: str, timeout: float = 30.0) -> dict:
    """{'id', 'history': [row, ...], 'summary': {...}, 'config': {...}, 'exit_code'} of the newest
    offline run. W&B's service process may still be writing when `run.finish()` returns (seen on a
    loaded machine): wait for the exit record, which it writes last."""
    deadline = time.monotonic() + timeout
    while True:
        out = _read(wandb_dir)
        if out["exit_code"] is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read(wandb_dir: str) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    # The newest run: W&B's own `latest-run` link, else the newest file. Not the last name in sorted
    # order: a second run started in the same second gets the same folder name with "-1" appended,
    # which sorts before it.
    latest = os.path.join(wandb_dir, "latest-run")
    runs = glob.glob(os.path.join(latest if os.path.isdir(latest) else os.path.join(wandb_dir, "offline-run-*"),
                                  "run-*.wandb"))
    path = max(runs, key=os.path.getmtime)
    out = {"id": os.path.basename(path)[4:-6], "history": [], "summary": {}, "config": {}, "exit_code": None}
    with open(path, "rb") as f:
        data = f.read()
    for chunk in _chunks(data):
        record = pb.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")

        def key(item):
            return item.key or "/".join(item.nested_key)

        if kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind in ("config", "run"):  # the config comes with the run record, updates after it
            items = record.config.update if kind == "config" else record.run.config.update
            out["config"].update({key(i): json.loads(i.value_json) for i in items})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
