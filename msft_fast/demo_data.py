"""Deterministic built-in synthetic multi-task mixture for ``make demo`` and the tests.

Writes small JSONL tasks of different size and difficulty (no downloads) for a tiny char-level model.
"""

from __future__ import annotations

import json
import os
import random
import string
import tempfile
from pathlib import Path
from typing import Callable

DEMO_VERSION = 1  # bump when the generated content changes

MANIFEST = "manifest.json"
WARMUP = "warmup"
MAX_ROW_CHARS = 80  # all text of one row together

_LOWER = string.ascii_lowercase
_CODE_CHARS = string.ascii_lowercase + string.digits
_ALLOWED = frozenset(chr(c) for c in range(32, 127)) | {"\n"}

# A sample is (key, prompt, completion); key identifies the input, for train/val/warm-up disjointness.
Sample = tuple[str, str, str]


# --------------------------------------------------------------------------- task families


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_LOWER) for _ in range(rng.randint(lo, hi)))


def gen_upper(rng: random.Random) -> Sample:
    """Uppercase a 3-7 letter word. Small and trivially learnable (a per-character map), so it is
    learnt within the first epochs and then over-fits: the early-stopping task of the mixture."""
    w = _word(rng, 3, 7)
    return w, f"Uppercase: {w}", w.upper()


def gen_noisy_codes(rng: random.Random) -> Sample:
    """Map a random 4-letter key to a random 4-character code. Nothing generalises, so it can only
    be memorised: train loss falls, validation loss rises once memorised (pure over-fitting signal)."""
    k = "".join(rng.choice(_LOWER) for _ in range(4))
    v = "".join(rng.choice(_CODE_CHARS) for _ in range(4))
    return k, f"code {k} = ", v


def gen_reverse(rng: random.Random) -> Sample:
    """Reverse a 3-8 letter string. Mid-sized and of mid difficulty (position-dependent copying):
    it keeps improving for a few epochs longer than `upper` before over-fitting."""
    w = _word(rng, 3, 8)
    return w, w, w[::-1]


def gen_sort(rng: random.Random) -> Sample:
    """Sort 4-8 letters alphabetically. Larger and harder (needs comparing all input letters), so
    it needs many epochs and over-fits late."""
    w = _word(rng, 4, 8)
    return w, f"sort {w} -> ", "".join(sorted(w))


def gen_add(rng: random.Random) -> Sample:
    """Add two 2-3 digit numbers. The largest and hardest task (carries), still improving when the
    small tasks are long memorised: the task that gains most from more epochs."""
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"{a}+{b}", f"{a}+{b}=", str(a + b)


# name -> (generator, row format, n_train, n_val, system prompt for chat rows)
_TASKS: list[tuple[str, Callable[[random.Random], Sample], str, int, int, str | None]] = [
    ("upper", gen_upper, "chat", 100, 50, None),
    ("noisy_codes", gen_noisy_codes, "prompt", 80, 40, None),
    ("reverse", gen_reverse, "chat", 300, 60, "Reverse the letters."),
    ("sort", gen_sort, "prompt", 500, 60, None),
    ("add", gen_add, "prompt", 1000, 80, None),
]
_WARMUP_TRAIN_PER_TASK = 100  # 500 rows in all
_WARMUP_VAL_PER_TASK = 10


# --------------------------------------------------------------------------- rows and files


def _row(fmt: str, prompt: str, completion: str, system: str | None) -> dict:
    if fmt == "chat":
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return {"messages": msgs}
    if fmt == "prompt":
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        sep = "" if prompt.endswith((" ", "=")) else "\n"  # "12+34=46", "sort ab -> ab", "abc\ncba"
        return {"text": prompt + sep + completion}
    raise ValueError(f"unknown row format {fmt!r}")


def row_texts(row: dict) -> list[str]:
    """The text fields of a demo row (for checks)."""
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    if "prompt" in row:
        return [row["prompt"], row["completion"]]
    return [row["text"]]


def _check(row: dict) -> None:
    texts = row_texts(row)
    bad = {c for t in texts for c in t} - _ALLOWED
    if bad or sum(map(len, texts)) > MAX_ROW_CHARS:
        raise AssertionError(f"demo row violates the char-level constraints: {row!r}")


def _atomic_write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


def _entry(out_dir: Path, name: str) -> dict:
    return {"name": name, "train": str(out_dir / name / "train.jsonl"), "val": str(out_dir / name / "val.jsonl")}


def _unique(rng: random.Random, gen: Callable[[random.Random], Sample], n: int, seen: set[str]) -> list[Sample]:
    out: list[Sample] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 1):
            raise RuntimeError(f"cannot draw {n} distinct samples from {gen.__name__}")
        s = gen(rng)
        if s[0] not in seen:
            seen.add(s[0])
            out.append(s)
    return out


def build_demo_mixture(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """All rows, in memory: {task name (and "warmup"): {"train": rows, "val": rows}}."""
    out: dict[str, dict[str, list[dict]]] = {}
    warm_train: list[dict] = []
    warm_val: list[dict] = []
    for name, gen, fmt, n_train, n_val, system in _TASKS:
        rng = random.Random(f"msft-demo/v{DEMO_VERSION}/{seed}/{name}")  # str seeds are stable
        seen: set[str] = set()  # one key set per family: train, val and warm-up inputs all differ
        tr = _unique(rng, gen, n_train, seen)
        va = _unique(rng, gen, n_val, seen)
        wt = _unique(rng, gen, _WARMUP_TRAIN_PER_TASK, seen)
        wv = _unique(rng, gen, _WARMUP_VAL_PER_TASK, seen)
        out[name] = {
            "train": [_row(fmt, p, c, system) for _, p, c in tr],
            "val": [_row(fmt, p, c, system) for _, p, c in va],
        }
        warm_train += [_row("text", p, c, None) for _, p, c in wt]
        warm_val += [_row("text", p, c, None) for _, p, c in wv]
    rng = random.Random(f"msft-demo/v{DEMO_VERSION}/{seed}/{WARMUP}")
    rng.shuffle(warm_train)
    rng.shuffle(warm_val)
    out[WARMUP] = {"train": warm_train, "val": warm_val}
    for splits in out.values():
        for rows in splits.values():
            for r in rows:
                _check(r)
    return out


# --------------------------------------------------------------------------- public API


def _manifest_ok(out_dir: Path, seed: int) -> bool:
    try:
        m = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(m, dict) or m.get("demo_version") != DEMO_VERSION or m.get("seed") != seed:
        return False
    files = m.get("files")
    if not isinstance(files, dict) or len(files) != 2 * (len(_TASKS) + 1):
        return False
    for rel, info in files.items():
        try:
            if (out_dir / rel).stat().st_size != info["bytes"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def write_demo_mixture(out_dir: str | os.PathLike, seed: int = 0) -> list[dict]:
    """Write the demo tasks under out_dir and return the task entries for a config:
    [{"name": ..., "train": ".../train.jsonl", "val": ".../val.jsonl"}, ...] (paths as str)."""
    out = Path(out_dir)
    entries = [_entry(out, name) for name, *_ in _TASKS]
    if _manifest_ok(out, seed):
        return entries
    out.mkdir(parents=True, exist_ok=True)
    try:  # never leave a manifest that vouches for half-rewritten files
        (out / MANIFEST).unlink()
    except FileNotFoundError:
        pass
    files: dict[str, dict] = {}
    for name, splits in build_demo_mixture(seed).items():
        for split, rows in splits.items():
            rel = f"{name}/{split}.jsonl"
            data = _jsonl(rows)
            _atomic_write(out / rel, data)
            files[rel] = {"rows": len(rows), "bytes": len(data.encode("ascii"))}
    manifest = {
        "demo_version": DEMO_VERSION,
        "seed": seed,
        "tasks": [{"name": n, "format": f, "train": f"{n}/train.jsonl", "val": f"{n}/val.jsonl"}
                  for n, _, f, *_ in _TASKS],
        "warmup": {"name": WARMUP, "format": "text", "train": f"{WARMUP}/train.jsonl", "val": f"{WARMUP}/val.jsonl"},
        "files": files,
    }
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last
    return entries


def warmup_entry(out_dir: str | os.PathLike) -> dict:
    """The warm-up pool ({"text": ...} rows from the same families, disjoint from the SFT rows) as
    a task entry; write_demo_mixture(out_dir) must have run first."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise FileNotFoundError(f"no demo mixture in {out}; call write_demo_mixture({str(out)!r}) first")
    return _entry(out, WARMUP)
