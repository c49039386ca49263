"""Deterministic built-in synthetic multi-task mixture for ``make demo`` and the tests.

Writes five small JSONL tasks and a separate warm-up pool from the same task families (no downloads),
sized for the built-in character-level tiny Llama. Calibrated so that, after the warm-up, plain SFT
on the mixture sees the tasks' validation losses bottom out at clearly different epochs.
"""

from __future__ import annotations

import json
import os
import random
import string
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

DEMO_VERSION = 2  # bump when the generated content changes

MANIFEST = "manifest.json"
WARMUP = "warmup"
MAX_ROW_CHARS = 80  # all text of one row together

_LOWER = string.ascii_lowercase
_CODE_CHARS = string.ascii_lowercase + string.digits
_ALLOWED = frozenset(chr(c) for c in range(32, 127)) | {"\n"}

# A family draws (input, answer); a template turns the input into a prompt. Inputs are what must
# never repeat: no input is in two of train, val and warm-up, nor in two tasks.
Draw = tuple[str, str]


# --------------------------------------------------------------------------- task families
# Words have a fixed length of five letters: the tiny model then finds each answer character at a
# fixed distance from its source, which it learns within the short warm-up; variable lengths need
# induction heads that it does not form in that budget.


def _word(rng: random.Random, n: int, alphabet: str = _LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def gen_upper(rng: random.Random) -> Draw:
    """Uppercase a word: a per-character map that the warm-up already teaches. Learnt again in the
    chat format within a few epochs, then flat."""
    w = _word(rng, 5)
    return w, w.upper()


def gen_noisy_codes(rng: random.Random) -> Draw:
    """A random code for a random key. Nothing generalises: the warm-up teaches the shape of a code,
    and SFT can only memorise its few facts, which makes the validation loss rise from the first
    epoch on (the early-stopping task of the mixture)."""
    return _word(rng, 4), _word(rng, 4, _CODE_CHARS)


def gen_reverse(rng: random.Random) -> Draw:
    """Reverse a word: a mirror copy that the tiny model learns slowly. Its small train set is
    memorised sooner than the rule is learnt, so it over-fits after a few epochs."""
    w = _word(rng, 5)
    return w, w[::-1]


def gen_sort(rng: random.Random) -> Draw:
    """Sort the letters of a word: a rule learnt gradually, over-fitting in mid run."""
    w = _word(rng, 5)
    return w, "".join(sorted(w))


def gen_add(rng: random.Random) -> Draw:
    """Add two three-digit numbers: the largest and hardest task (carries), still improving at the
    end of the run: the task that gains most from more epochs."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"{a}+{b}", str(a + b)


class _Task(NamedTuple):
    name: str
    gen: Callable[[random.Random], Draw]
    fmt: str  # row format in the SFT mixture: "chat" or "prompt" (the warm-up pool is "text")
    templates: tuple[str, ...]  # ways of asking, shared by the SFT rows and the warm-up pool
    n_train: int  # distinct train inputs
    phrasings: int  # train rows per train input (each a different template)
    n_val: int
    n_warmup: int  # warm-up rows of this family


_TASKS: tuple[_Task, ...] = (
    _Task("upper", gen_upper, "chat", ("upper {} = ", "uppercase {} = ", "in capitals {} = ", "shout {} = "),
          100, 1, 100, 2000),
    # 40 facts, each asked three ways; a small warm-up share, so SFT first sharpens the code shape.
    _Task("noisy_codes", gen_noisy_codes, "prompt",
          ("code {} = ", "code of {} = ", "the code for {} = ", "look up code {} = "), 40, 3, 100, 300),
    _Task("reverse", gen_reverse, "prompt", ("reverse {} = ", "reversed {} = ", "mirror {} = ", "backwards {} = "),
          150, 1, 100, 2000),
    _Task("sort", gen_sort, "prompt", ("sort {} = ", "sorted {} = ", "sort letters {} = ", "alphabetize {} = "),
          200, 1, 100, 2000),
    _Task("add", gen_add, "prompt", ("{}=", "add {}=", "sum {}=", "compute {}="), 1000, 1, 100, 2000),
)
_WARMUP_VAL_PER_TASK = 20


# --------------------------------------------------------------------------- rows and files


def _row(fmt: str, prompt: str, completion: str) -> dict:
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": completion}]}
    if fmt == "prompt":
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        return {"text": prompt + completion}  # every template ends in "= " or "="
    raise ValueError(f"unknown row format {fmt!r}")


def row_texts(row: dict) -> list[str]:
    """The text fields of a demo row (for checks)."""
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    if "prompt" in row:
        return [row["prompt"], row["completion"]]
    return [row["text"]]


def row_input(row: dict) -> str:
    """The input that a demo row asks about ("abcde", "123+456"), whatever its format and phrasing."""
    texts = row_texts(row)
    question = texts[0] if "text" in row else texts[-2]
    return question.rsplit("=", 1)[0].split()[-1]


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


def _unique(rng: random.Random, gen: Callable[[random.Random], Draw], n: int, seen: set[str]) -> list[Draw]:
    out: list[Draw] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 1):
            raise RuntimeError(f"cannot draw {n} distinct samples from {gen.__name__}")
        d = gen(rng)
        if d[0] not in seen:
            seen.add(d[0])
            out.append(d)
    return out


def build_demo_mixture(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """All rows, in memory: {task name (and "warmup"): {"train": rows, "val": rows}}."""
    out: dict[str, dict[str, list[dict]]] = {}
    warm_train: list[dict] = []
    warm_val: list[dict] = []
    seen: set[str] = set()  # one input set for everything: train, val and warm-up inputs all differ
    for task in _TASKS:
        rng = random.Random(f"msft-demo/v{DEMO_VERSION}/{seed}/{task.name}")  # str seeds are stable
        tr = _unique(rng, task.gen, task.n_train, seen)
        va = _unique(rng, task.gen, task.n_val, seen)
        wt = _unique(rng, task.gen, task.n_warmup, seen)
        wv = _unique(rng, task.gen, _WARMUP_VAL_PER_TASK, seen)
        train = [_row(task.fmt, t.format(x), y) for x, y in tr for t in rng.sample(task.templates, task.phrasings)]
        rng.shuffle(train)
        out[task.name] = {
            "train": train,
            "val": [_row(task.fmt, rng.choice(task.templates).format(x), y) for x, y in va],
        }
        warm_train += [_row("text", rng.choice(task.templates).format(x), y) for x, y in wt]
        warm_val += [_row("text", rng.choice(task.templates).format(x), y) for x, y in wv]
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
    entries = [_entry(out, t.name) for t in _TASKS]
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
        "tasks": [{"name": t.name, "format": t.fmt, "train": f"{t.name}/train.jsonl", "val": f"{t.name}/val.jsonl"}
                  for t in _TASKS],
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
