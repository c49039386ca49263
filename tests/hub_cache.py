"""Lay out repos in a folder exactly as huggingface_hub's cache holds them, so that Hub names resolve
with no network: `models--org--name/` (or `datasets--...`) with `blobs/<sha256>`, `snapshots/<commit>/`
whose files are relative links into blobs/, and `refs/<branch or tag>` holding the commit."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path


def commit_of(text: str) -> str:
    """A made-up 40-hex commit id."""
    return hashlib.sha1(text.encode()).hexdigest()


def put_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, refs: tuple[str, ...] = ("main",),
             repo_type: str = "model") -> Path:
    """One commit of a repo in the cache; returns its snapshot folder."""
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path (a saved model folder to put in the cache)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


# A dataset repo as the Hub shows them: a README whose YAML header names the configs and their
# splits' files (openai/gsm8k has `main` and `socratic` like this).
TOY_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*.parquet
  - split: test
    path: main/test-*.parquet
- config_name: other
  data_files:
  - split: train
    path: other/train-*.parquet
---
# toy

Arithmetic questions in two configs.
"""


def toy_rows(split: str, n: int) -> list[dict]:
    """prompt/completion rows the built-in tokenizer encodes (printable ASCII)."""
    start = 0 if split == "train" else 100
    return [{"question": f"{i} + {i % 7} =", "answer": f" {i + i % 7}"} for i in range(start, start + n)]


def toy_dataset_files(train: int = 12, test: int = 4) -> dict[str, bytes]:
    return {
        "README.md": TOY_README.encode(),
        "main/train-00000-of-00001.parquet": parquet_bytes(toy_rows("train", train)),
        "main/test-00000-of-00001.parquet": parquet_bytes(toy_rows("test", test)),
        "other/train-00000-of-00001.parquet": parquet_bytes([{"text": f"other {i}"} for i in range(3)]),
    }
