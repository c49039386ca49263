"""Deterministic built-in synthetic multi-task mixtures for ``make demo`` and the tests.

Writes small JSONL tasks of different size and difficulty (no downloads) for a tiny char-level model,
plus a warm-up pool from the same task families (a stand-in for pretraining). Two variants:

- ``compact`` (the default of `write_demo_mixture`, what the test suite trains on): small and quick;
  the tiny model learns little of it, so its validation curves are mostly noise.
- ``calibrated`` (what ``msft-fast demo-data`` and ``make demo`` write): fixed-length inputs the tiny
  model can learn, a large warm-up pool that teaches every family, and 160 validation rows per task,
  so that in plain SFT the tasks' validation losses bottom out at clearly different epochs.
"""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path
from typing import Callable, NamedTuple

from msft_fast.state.atomic_io import create_temp_file

DEMO_VERSION = 1  # bump when the generated content of the compact variant changes
CALIBRATED_VERSION = 2  # bump when the generated content of the calibrated variant changes
VARIANTS = ("compact", "calibrated")
DEFAULT_VARIANT = "compact"  # the tests' data; the CLI writes "calibrated"

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
    fd, tmp = create_temp_file(str(path.parent), prefix=f".{path.name}.", suffix=".tmp")  # umask permissions
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


def _build_compact(seed: int) -> dict[str, dict[str, list[dict]]]:
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
    return out


# --------------------------------------------------------------------------- the calibrated variant
# Words have a fixed length of five letters: the tiny model then finds each answer character at a
# fixed distance from its source, which it learns within the warm-up; variable lengths need
# induction heads that it does not form in that budget. Every family is asked in a few ways
# ("templates"), shared by the SFT rows and the warm-up pool (noisy_codes' SFT rows excepted). A draw
# is (input, answer); inputs never repeat across train, val, warm-up, nor across tasks.

Draw = tuple[str, str]


def _fixed_word(rng: random.Random, n: int, alphabet: str = _LOWER) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def draw_upper(rng: random.Random) -> Draw:
    """Uppercase a word: a per-character map the warm-up already teaches. The SFT rows are chat rows,
    a format the warm-up never shows: SFT relearns it in about three epochs, then it levels off."""
    w = _fixed_word(rng, 5)
    return w, w.upper()


def draw_noisy_codes(rng: random.Random) -> Draw:
    """A random code for a random key. Nothing generalises: the warm-up teaches the shape of a code,
    SFT can only memorise its few facts, so the validation loss bottoms out within the first epoch
    and climbs for the rest of the run (the early-stopping task of the mixture). Part of that climb
    is forgetting, not memorisation: it climbs, more slowly, once the task is left out of training."""
    return _fixed_word(rng, 4), _fixed_word(rng, 4, _CODE_CHARS)


def draw_reverse(rng: random.Random) -> Draw:
    """Reverse a word: a mirror copy the tiny model learns slowly and only in part; its small train
    set gets memorised while the rule barely moves, so it levels off after four to five epochs."""
    w = _fixed_word(rng, 5)
    return w, w[::-1]


def draw_sort(rng: random.Random) -> Draw:
    """Sort the letters of a word: learnt gradually from a mid-sized set; levels off after about four epochs."""
    w = _fixed_word(rng, 5)
    return w, "".join(sorted(w))


def draw_add(rng: random.Random) -> Draw:
    """Add two three-digit numbers: the largest and hardest task (carries), still improving at the
    end of the run: the task that gains most from more epochs."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"{a}+{b}", str(a + b)


class _Task(NamedTuple):
    name: str
    draw: Callable[[random.Random], Draw]
    fmt: str  # row format in the SFT mixture: "chat" or "prompt" (the warm-up pool is "text")
    templates: tuple[str, ...]  # ways of asking
    n_train: int  # distinct train inputs
    phrasings: int  # train rows per train input (each a different template)
    n_val: int
    n_warmup: int  # warm-up rows of this family
    sft_templates: tuple[str, ...] = ()  # ways of asking in the SFT rows only, if not `templates`


_CALIBRATED: tuple[_Task, ...] = (
    _Task("upper", draw_upper, "chat", ("upper {} = ", "uppercase {} = ", "in capitals {} = ", "shout {} = "),
          100, 1, 160, 2000),
    # 24 facts, each asked five ways (memorised five times as fast as one way), in phrasings the
    # warm-up never shows: SFT first learns that they too ask for a code (the validation loss falls
    # within the first epoch), then memorises the facts (it rises, to 3.9 by epoch 6 in SFT against
    # 3.3 once the task is excluded: with 40 facts asked three ways the two climbed about as fast).
    _Task("noisy_codes", draw_noisy_codes, "prompt",
          ("code {} = ", "code of {} = ", "the code for {} = ", "look up code {} = "), 24, 5, 160, 300,
          ("key {} = ", "id of {} = ", "tag for {} = ", "pin of {} = ", "label {} = ")),
    _Task("reverse", draw_reverse, "prompt", ("reverse {} = ", "reversed {} = ", "mirror {} = ", "backwards {} = "),
          150, 1, 160, 2000),
    _Task("sort", draw_sort, "prompt", ("sort {} = ", "sorted {} = ", "sort letters {} = ", "alphabetize {} = "),
          240, 1, 160, 2000),
    _Task("add", draw_add, "prompt", ("{}=", "add {}=", "sum {}=", "compute {}="), 1000, 1, 160, 2000),
)
_CALIBRATED_WARMUP_VAL_PER_TASK = 20


def _calibrated_row(fmt: str, prompt: str, completion: str) -> dict:
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": completion}]}
    if fmt == "prompt":
        return {"prompt": prompt, "completion": completion}
    return {"text": prompt + completion}  # every template ends in "= " or "="


def row_input(row: dict) -> str:
    """The input a calibrated demo row asks about ("abcde", "123+456"), whatever its format and phrasing."""
    texts = row_texts(row)
    question = texts[0] if "text" in row else texts[-2]
    return question.rsplit("=", 1)[0].split()[-1]


def _build_calibrated(seed: int) -> dict[str, dict[str, list[dict]]]:
    # The random streams are named apart from CALIBRATED_VERSION, so that resizing one task (and
    # bumping the version, as every change must) leaves the other tasks' rows as they were.
    tag = f"msft-demo/calibrated/v1/{seed}"
    out: dict[str, dict[str, list[dict]]] = {}
    warm_train: list[dict] = []
    warm_val: list[dict] = []
    seen: set[str] = set()  # one input set for everything
    # The warm-up pool is drawn first, from its own streams, so that resizing the SFT tasks leaves it be.
    for task in _CALIBRATED:
        rng = random.Random(f"{tag}/{WARMUP}/{task.name}")  # str seeds are stable
        wt = _unique(rng, task.draw, task.n_warmup, seen)
        wv = _unique(rng, task.draw, _CALIBRATED_WARMUP_VAL_PER_TASK, seen)
        warm_train += [_calibrated_row("text", rng.choice(task.templates).format(x), y) for x, y in wt]
        warm_val += [_calibrated_row("text", rng.choice(task.templates).format(x), y) for x, y in wv]
    for task in _CALIBRATED:
        rng = random.Random(f"{tag}/{task.name}")
        templates = task.sft_templates or task.templates
        tr = _unique(rng, task.draw, task.n_train, seen)
        train = [_calibrated_row(task.fmt, t.format(x), y)
                 for x, y in tr for t in rng.sample(templates, task.phrasings)]
        rng.shuffle(train)  # train rows are settled before val is drawn: resizing val leaves them be
        va = _unique(rng, task.draw, task.n_val, seen)
        out[task.name] = {
            "train": train,
            "val": [_calibrated_row(task.fmt, rng.choice(templates).format(x), y) for x, y in va],
        }
    rng = random.Random(f"{tag}/{WARMUP}")
    rng.shuffle(warm_train)
    rng.shuffle(warm_val)
    out[WARMUP] = {"train": warm_train, "val": warm_val}
    return out


# --------------------------------------------------------------------------- public API


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; one of {', '.join(VARIANTS)}")


def _task_formats(variant: str) -> list[tuple[str, str]]:
    if variant == "calibrated":
        return [(t.name, t.fmt) for t in _CALIBRATED]
    return [(name, fmt) for name, _, fmt, *_ in _TASKS]


def _version(variant: str) -> int:
    return CALIBRATED_VERSION if variant == "calibrated" else DEMO_VERSION


def build_demo_mixture(seed: int = 0, variant: str = DEFAULT_VARIANT) -> dict[str, dict[str, list[dict]]]:
    """All rows, in memory: {task name (and "warmup"): {"train": rows, "val": rows}}."""
    _check_variant(variant)
    out = _build_calibrated(seed) if variant == "calibrated" else _build_compact(seed)
    for splits in out.values():
        for rows in splits.values():
            for r in rows:
                _check(r)
    return out


def _manifest_ok(out_dir: Path, seed: int, variant: str) -> bool:
    try:
        m = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if (not isinstance(m, dict) or m.get("variant", DEFAULT_VARIANT) != variant
            or m.get("demo_version") != _version(variant) or m.get("seed") != seed):
        return False
    files = m.get("files")
    if not isinstance(files, dict) or len(files) != 2 * (len(_task_formats(variant)) + 1):
        return False
    for rel, info in files.items():
        try:
            if (out_dir / rel).stat().st_size != info["bytes"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def write_demo_mixture(out_dir: str | os.PathLike, seed: int = 0, variant: str = DEFAULT_VARIANT) -> list[dict]:
    """Write the demo tasks of `variant` (see the module doc) under out_dir and return the task entries
    for a config: [{"name": ..., "train": ".../train.jsonl", "val": ".../val.jsonl"}, ...] (paths as str)."""
    _check_variant(variant)
    out = Path(out_dir)
    formats = _task_formats(variant)
    entries = [_entry(out, name) for name, _ in formats]
    if _manifest_ok(out, seed, variant):
        return entries
    out.mkdir(parents=True, exist_ok=True)
    try:  # never leave a manifest that vouches for half-rewritten files
        (out / MANIFEST).unlink()
    except FileNotFoundError:
        pass
    files: dict[str, dict] = {}
    for name, splits in build_demo_mixture(seed, variant).items():
        for split, rows in splits.items():
            rel = f"{name}/{split}.jsonl"
            data = _jsonl(rows)
            _atomic_write(out / rel, data)
            files[rel] = {"rows": len(rows), "bytes": len(data.encode("ascii"))}
    manifest = {
        "demo_version": _version(variant),
        "seed": seed,
        "tasks": [{"name": n, "format": f, "train": f"{n}/train.jsonl", "val": f"{n}/val.jsonl"} for n, f in formats],
        "warmup": {"name": WARMUP, "format": "text", "train": f"{WARMUP}/train.jsonl", "val": f"{WARMUP}/val.jsonl"},
        "files": files,
    }
    if variant != DEFAULT_VARIANT:  # the compact variant's manifest stays as it always was
        manifest["variant"] = variant
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last
    return entries


def warmup_entry(out_dir: str | os.PathLike) -> dict:
    """The warm-up pool ({"text": ...} rows from the same families, disjoint from the SFT rows) as
    a task entry; write_demo_mixture(out_dir) must have run first."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise FileNotFoundError(f"no demo mixture in {out}; call write_demo_mixture({str(out)!r}) first")
    return _entry(out, WARMUP)
