"""Read each task's files with HF `datasets`, tokenize them once (cached), and expose flat arrays.

A task ends as two `DocSet`s (train and validation): token ids and shifted labels of all its
documents in two flat arrays, plus where each document starts. Packing reads only those arrays.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from msft_fast.config import DataConfig, TaskConfig, resolve_path
from msft_fast.data.formats import IGNORE_INDEX, RowEncoder, RowError, detect_format, labels_from_mask
from msft_fast.errors import ConfigError, DataError
from msft_fast.hub import HubSource, cached_snapshot, dataset_source, is_offline

TOKENIZE_VERSION = 2  # bump when the encoding changes, so cached tokenizations are not reused

# Row status written by tokenization. Dropped rows stay in the cache (so counts survive caching)
# and are filtered out in numpy afterwards. TRUNCATED_EMPTY: truncation left no trained token (a
# prompt longer than max_seq_len), so the row is lost to the length limit, not to its content.
OK, TRUNCATED, DROPPED_OVERLONG, NO_TRAINED_TOKENS, TRUNCATED_EMPTY = 0, 1, 2, 3, 4
# A task losing more than this share of a split's rows to data.max_seq_len gets a warning.
LOST_ROWS_WARNING = 0.10


DIGEST_DOCS = 4096  # documents hashed per slice by DocSet.digest


@dataclass
class DocSet:
    """Documents of one split of one task. Document d is tokens[starts[d] : starts[d] + lengths[d]]."""

    input_ids: np.ndarray  # [total] int32
    labels: np.ndarray  # [total] int32, shifted, IGNORE_INDEX where not trained
    starts: np.ndarray  # [D] int64
    lengths: np.ndarray  # [D] int64
    loss_tokens: np.ndarray  # [D] int64, tokens with a label in each document
    format: Optional[str] = None  # the row format they were encoded from (messages, prompt_completion, text)

    def __len__(self) -> int:
        return len(self.starts)

    def digest(self) -> str:
        """A hash of exactly the documents this set holds: their token ids and labels, in order. It
        changes with the data, the tokenizer, the chat template or any option that shapes them."""
        ids, labels = hashlib.sha256(), hashlib.sha256()
        for lo in range(0, len(self), DIGEST_DOCS):  # a few thousand documents at a time: bounded memory
            starts = self.starts[lo : lo + DIGEST_DOCS].astype(np.int64)
            lengths = self.lengths[lo : lo + DIGEST_DOCS].astype(np.int64)
            # Each document's token positions, documents in order: start + (0 .. length-1).
            idx = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
            ids.update(self.input_ids[idx].astype(np.int32).tobytes())
            labels.update(self.labels[idx].astype(np.int32).tobytes())
        lengths = self.lengths.astype(np.int64).tobytes()
        return hashlib.sha256(lengths + ids.digest() + labels.digest()).hexdigest()[:32]

    def subset(self, docs: np.ndarray) -> "DocSet":
        return DocSet(self.input_ids, self.labels, self.starts[docs], self.lengths[docs], self.loss_tokens[docs],
                      self.format)


@dataclass
class TaskData:
    name: str
    task_id: int
    train: DocSet
    val: DocSet
    # Per split: rows read from the file, truncated, dropped (and why), tokens the tokenizer could
    # not encode; documents trained on and evaluated (train_docs, val_docs; val_held_out when the
    # validation split was held out of the train file). Recorded in history.json under `data`.
    counts: dict[str, int] = field(default_factory=dict)
    # Where each split came from (path or Hub dataset, config, split, commit): history.json `data_sources`.
    sources: dict[str, dict] = field(default_factory=dict)


def load_tasks(cfg: DataConfig, tokenizer: Any, commits: Optional[dict] = None) -> list[TaskData]:
    """Load, tokenize and split every task in `cfg.tasks`, in order (task id = position).

    commits: `hub.pin_commits` of the run (a Hub dataset is read at its commit); None: pin here.
    """
    import datasets

    datasets.disable_progress_bars()
    tok_key = _tokenizer_fingerprint(tokenizer)
    out = []
    for task_id, task in enumerate(cfg.tasks):
        train_src = task_source(task, task_id, "train", commits)
        val_src = task_source(task, task_id, "val", commits)
        _check_dataset_keys(task, task_id, train_src, val_src)
        train = _tokenize_source(task, train_src, cfg, tokenizer, tok_key)
        counts = {f"train_{k}": v for k, v in train[1].items()}
        if val_src is not None:
            val_docs, val_counts = _tokenize_source(task, val_src, cfg, tokenizer, tok_key)
            train_docs = train[0]
            counts.update({f"val_{k}": v for k, v in val_counts.items()})
        else:
            train_docs, val_docs = _hold_out(train[0], task.val_fraction, cfg.split_seed)
            counts["val_held_out"] = len(val_docs)
        counts.update(train_docs=len(train_docs), val_docs=len(val_docs))
        if len(train_docs) == 0:
            raise DataError(f"task '{task.name}' has no usable training rows in {train_src.shown} "
                            f"({_why_empty(counts, 'train')}){_overlong_hint(counts, 'train')}")
        if len(val_docs) == 0:
            if val_src is not None:
                raise DataError(f"task '{task.name}' has an empty validation split ({val_src.shown}: "
                                f"{_why_empty(counts, 'val')}){_overlong_hint(counts, 'val')}")
            raise DataError(f"task '{task.name}' has an empty validation split (val_fraction={task.val_fraction} "
                            f"of {len(train_docs)} usable rows of {train_src.shown}): it needs at least 2 usable rows")
        out.append(TaskData(task.name, task_id, train_docs, val_docs, counts, _sources(train_src, val_src)))
    return out


@dataclass(frozen=True)
class DataSource:
    """Where one split of a task is read from: a local file or folder, or a Hub dataset at a commit."""

    role: str  # train | validation
    name: str  # the local path (absolute), or the Hub repo id
    key: str  # the config key that names it: data.tasks[i].train or .val
    split: str  # datasets' split syntax: train, validation, train[:90%]
    split_key: str  # the config key that set the split
    config: Optional[str]  # the dataset config (subset)
    config_key: str
    hub: Optional[HubSource] = None
    commit: Optional[str] = None  # a Hub dataset's commit (None: neither the Hub nor the cache knew it)

    @property
    def shown(self) -> str:
        """How messages name it: the path, or the repo id with what was asked of it."""
        if self.hub is None:
            return self.name
        parts = [f"config {self.config}"] if self.config else []
        parts += [f"split {self.split}", f"revision {self.hub.revision or 'main'}"]
        return f"{self.name} ({', '.join(parts)})"

    def where(self, task: str) -> str:
        """The start of every message about it: "task 'x': train file /d/x.jsonl"."""
        if self.hub is not None:
            return f"task '{task}': {self.role} dataset {self.shown}"
        return f"task '{task}': {self.role} {'folder' if os.path.isdir(self.name) else 'file'} {self.name}"

    def fingerprint(self) -> list:
        """What names these rows, for the tokenization cache key (with the rows' own fingerprint)."""
        return [self.name, self.config, self.split, self.hub.revision if self.hub else None, self.commit]

    def record(self) -> dict:
        """history.json `data_sources`: where the rows came from."""
        out = {"path" if self.hub is None else "dataset": self.name, "split": self.split}
        if self.config:
            out["config"] = self.config
        if self.hub is not None:
            out.update(revision=self.hub.revision or "main", commit=self.commit)
        return out


def task_source(task: TaskConfig, index: int, field: str, commits: Optional[dict]) -> Optional[DataSource]:
    """The task's `train` or `val` source (None for `val` when validation rows are held out of train).
    `val_split` without `val` is a split of the train source."""
    key = f"data.tasks[{index}]"
    if field == "val" and task.val is None:
        if task.val_split is None:
            return None
        field, split, split_key = "train", task.val_split, f"{key}.val_split"
    elif field == "val":
        split, split_key = task.val_split or "train", f"{key}.val_split"
    else:
        split, split_key = task.split, f"{key}.split"
    value = getattr(task, field)
    hub = dataset_source(task, index, field)
    role = "train" if split_key.endswith(".split") else "validation"
    config_key = f"{key}.{'config' if field == 'train' else 'val_config'}"
    config = getattr(task, config_key.rsplit(".", 1)[1])
    if hub is None:
        return DataSource(role, resolve_path(value), f"{key}.{field}", split, split_key, config, config_key)
    commit = commits.get(f"{key}.{field}") if commits is not None else hub.pin()
    return DataSource(role, hub.repo_id, f"{key}.{field}", split, split_key, config, config_key, hub, commit)


def _check_dataset_keys(task: TaskConfig, index: int, train: DataSource, val: Optional[DataSource]) -> None:
    """`config`/`revision` (of train) and `val_config`/`val_revision` (of a separate val) must apply to
    their source, or they would silently mean nothing."""
    separate_val = val if task.val is not None else None
    for source, role, config_key, revision_key in ((train, "train", "config", "revision"),
                                                   (separate_val, "val", "val_config", "val_revision")):
        revision, config = getattr(task, revision_key), getattr(task, config_key)
        if revision is not None and (source is None or source.hub is None):
            raise ConfigError(f"config key 'data.tasks[{index}].{revision_key}' ({revision}) applies to a Hub dataset, "
                              f"but task '{task.name}' has {_what(source, role)}")
        if config is not None and (source is None or not (source.hub or _is_dataset_repo(source.name))):
            raise ConfigError(f"config key 'data.tasks[{index}].{config_key}' ({config}) applies to a Hub dataset or a "
                              f"dataset repo folder, but task '{task.name}' has {_what(source, role)}")


def _what(source: Optional[DataSource], field: str) -> str:
    if source is None:
        return f"no {field}"
    return f"the local {'folder' if os.path.isdir(source.name) else 'file'} {source.name} as {field}"


def _sources(train: DataSource, val: Optional[DataSource]) -> dict:
    return {"train": train.record(), **({"val": val.record()} if val is not None else {})}


def _why_empty(counts: dict[str, int], split: str) -> str:
    keys = ("rows", "truncated", "dropped_overlong", "dropped_no_trained_tokens")
    return ", ".join(f"{k}: {counts[f'{split}_{k}']}" for k in keys if f"{split}_{k}" in counts)


def _overlong_hint(counts: dict[str, int], split: str) -> str:
    if counts.get(f"{split}_dropped_overlong"):
        return "; raise data.max_seq_len or set data.overlong=truncate"
    return ""


def _hold_out(docs: DocSet, fraction: float, seed: int) -> tuple[DocSet, DocSet]:
    """A fixed random `fraction` of the documents (at least one) becomes the validation split."""
    n = len(docs)
    if n < 2:
        return docs, docs.subset(np.zeros(0, dtype=np.int64))
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * fraction))))
    return docs.subset(np.sort(perm[n_val:])), docs.subset(np.sort(perm[:n_val]))


# ---------------------------------------------------------------------------------------------
# Reading and tokenizing one file


def _tokenize_source(task: TaskConfig, src: DataSource, cfg: DataConfig, tokenizer: Any, tok_key: str):
    """Rows of one source as a DocSet plus counts."""
    where = src.where(task.name)
    raw, own_folder = _read_rows(src, cfg.cache_dir, where)
    if len(raw) == 0:
        raise DataError(f"{where} has no rows")
    raw = _rename_columns(raw, task.columns, where, src.key.rsplit(".", 1)[0] + ".columns")
    try:
        fmt = task.format if task.format != "auto" else detect_format(raw.column_names)
        encoder = RowEncoder(tokenizer, fmt, cfg.empty_think_blocks)
    except RowError as e:
        raise DataError(f"{where}: {e}") from None

    max_len, policy = cfg.max_seq_len, cfg.overlong

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        ids_out, labels_out, status_out = [], [], []
        for j, idx in enumerate(indices):
            row = {k: v[j] for k, v in batch.items()}
            try:
                ids, mask = encoder.encode(row)
            except RowError as e:
                raise DataError(f"{where}: row {idx + 1}: {e}") from None
            status = OK
            if len(ids) > max_len:
                status = TRUNCATED if policy == "truncate" else DROPPED_OVERLONG
                ids, mask = ids[:max_len], mask[:max_len]
            labels = labels_from_mask(ids, mask)
            if status != DROPPED_OVERLONG and all(lab == IGNORE_INDEX for lab in labels):
                status = TRUNCATED_EMPTY if status == TRUNCATED else NO_TRAINED_TOKENS
            ids_out.append(ids)
            labels_out.append(labels)
            status_out.append(status)
        return {"input_ids": ids_out, "labels": labels_out, "status": status_out}

    key = hashlib.sha256(json.dumps([TOKENIZE_VERSION, raw._fingerprint, src.fingerprint(), tok_key, fmt, max_len,
                                     policy, cfg.empty_think_blocks]).encode()).hexdigest()[:32]
    import datasets

    tokenized = raw.map(
        encode_batch,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        new_fingerprint=key,
        # datasets would write the cache beside the source files; a saved dataset folder is the
        # user's (maybe read-only), so its tokenization goes to our cache folder instead.
        cache_file_name=_cache_file(cfg.cache_dir, key) if own_folder else None,
        num_proc=cfg.num_proc,
        features=datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "labels": datasets.Sequence(datasets.Value("int32")),
                "status": datasets.Value("int8"),
            }
        ),
    )
    docs, counts = _to_docset(tokenized, getattr(tokenizer, "unk_token_id", None))
    docs.format = fmt
    return docs, counts


def _to_docset(tokenized: Any, unk_id: Optional[int] = None) -> tuple[DocSet, dict[str, int]]:
    """Flat numpy views of the tokenized arrow table (memory-mapped, no per-row Python objects)."""
    table = tokenized.data
    status = table.column("status").to_numpy()
    ids, offsets = _flat(table.column("input_ids"))
    labels, _ = _flat(table.column("labels"))
    keep = np.flatnonzero((status == OK) | (status == TRUNCATED))
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    trained = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX, dtype=np.int64)])
    loss_tokens = trained[offsets[1:]] - trained[offsets[:-1]]
    counts = {
        "rows": int(len(status)),
        "truncated": int((status == TRUNCATED).sum()),
        "dropped_overlong": int((status == DROPPED_OVERLONG).sum()),
        "dropped_no_trained_tokens": int(((status == NO_TRAINED_TOKENS) | (status == TRUNCATED_EMPTY)).sum()),
        # Rows the length limit cost: dropped as over-long, or truncated down to no trained token.
        "lost_to_max_seq_len": int(((status == DROPPED_OVERLONG) | (status == TRUNCATED_EMPTY)).sum()),
    }
    if unk_id is not None:  # characters the tokenizer cannot encode, in the rows that are kept
        unk = np.concatenate([[0], np.cumsum(ids == unk_id, dtype=np.int64)])
        per_row = (unk[offsets[1:]] - unk[offsets[:-1]])[keep]
        counts.update(unk_tokens=int(per_row.sum()), rows_with_unk=int((per_row > 0).sum()))
    return DocSet(ids, labels, starts[keep], lengths[keep], loss_tokens[keep]), counts


def data_warnings(tasks: list[TaskData], cfg: DataConfig, tokenizer: Any) -> list[str]:
    """What a run may go on with but the user should hear about: a task losing more than 10% of a
    split's rows to data.max_seq_len (or having them truncated), and text the tokenizer turned into
    its unknown token (the built-in tokenizer knows printable ASCII and newlines only)."""
    out = []
    unk = getattr(tokenizer, "unk_token", None) or "<unk>"
    for t in tasks:
        c = t.counts
        for split, what in (("train", "train"), ("val", "validation")):
            rows = c.get(f"{split}_rows")
            if not rows:
                continue
            lost, cut = c.get(f"{split}_lost_to_max_seq_len", 0), c.get(f"{split}_truncated", 0)
            if lost > LOST_ROWS_WARNING * rows:
                how = ("longer than data.max_seq_len and dropped (data.overlong=drop)" if cfg.overlong == "drop" else
                       "truncated by data.max_seq_len to no trained token, and dropped")
                out.append(f"task '{t.name}': {lost} of {rows} {what} rows ({100 * lost / rows:.0f}%) are lost: {how}; "
                           f"raise data.max_seq_len (now {cfg.max_seq_len})")
            if cut > LOST_ROWS_WARNING * rows:
                out.append(f"task '{t.name}': {cut} of {rows} {what} rows ({100 * cut / rows:.0f}%) are truncated to "
                           f"data.max_seq_len={cfg.max_seq_len} tokens (their ends are not trained on or evaluated)")
            if c.get(f"{split}_unk_tokens"):
                out.append(f"task '{t.name}': {c[f'{split}_rows_with_unk']} of {rows} {what} rows hold "
                           f"{c[f'{split}_unk_tokens']} character(s) the tokenizer cannot encode; they became {unk}"
                           + (" (the built-in tokenizer knows printable ASCII and newlines only)"
                              if _is_builtin(tokenizer) else ""))
    return out


def _is_builtin(tokenizer: Any) -> bool:
    from msft_fast.builtin import CHAT_TEMPLATE

    return getattr(tokenizer, "chat_template", None) == CHAT_TEMPLATE


def _flat(column: Any) -> tuple[np.ndarray, np.ndarray]:
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy()
    # `values` ignores a slice of the list array; cut it to the rows the offsets cover.
    values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def _cache_file(cache_dir: Optional[str], key: str) -> str:
    import datasets

    folder = os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, "msft_fast_tokenized")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"tokenized-{key}.arrow")


def _read_rows(src: DataSource, cache_dir: Optional[str], where: str) -> tuple[Any, bool]:
    """The rows of `src` as a Dataset, and whether they come from a saved dataset folder (the
    user's, so its tokenization is cached elsewhere). `where` names the source in errors."""
    import datasets

    if src.hub is not None:
        return _read_hub(src, cache_dir, where), False
    path = src.name
    if not os.path.exists(path):
        raise DataError(f"{where} does not exist (config key '{src.key}')")
    if os.path.isdir(path) and not _is_dataset_repo(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # datasets raises several types for a folder it cannot read
            raise DataError(f"{where} is not a saved HF dataset folder: {_one_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{where} holds splits {list(ds)}, not '{src.split}': set {src.split_key} to one "
                                "of them, or point at one split's folder")
            ds = ds[src.split]
        elif src.split != "train":
            raise DataError(f"{where} is a saved Dataset (one split), so {src.split_key} ({src.split}) cannot "
                            "select from it")
        return ds, True
    if os.path.isdir(path):  # a dataset repo laid out locally: README configs, data/*.parquet, ...
        return _load_dataset(src, where, cache_dir, path), False
    ext = os.path.splitext(path)[1].lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}.get(ext)
    if builder is None:
        raise DataError(f"{where}: unsupported extension '{ext}' (use .jsonl, .json, .parquet or .arrow)")
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)  # we report the failure ourselves, in one sentence
    try:
        return datasets.load_dataset(builder, data_files=path, split=src.split, cache_dir=cache_dir), False
    except Exception as e:
        if _is_split_error(e):  # a single file is the split `train`; slices of it work
            raise DataError(f"{where} has only the split 'train' (a single file), so {src.split_key} ({src.split}) "
                            "cannot be read from it") from None
        if builder == "json":
            _raise_first_bad_json_line(path, where)
        raise DataError(f"{where} cannot be read: {_one_line(e)}") from None
    finally:
        ds_logger.setLevel(level)


def _rename_columns(raw: Any, columns: Optional[dict[str, str]], where: str, key: str) -> Any:
    """`columns` ({prompt: question, completion: answer}) gives the dataset's columns our names; a
    column that already has one of those names, and is not mapped, gives way."""
    if not columns:
        return raw
    missing = {ours: theirs for ours, theirs in columns.items() if theirs not in raw.column_names}
    if missing:
        ours, theirs = next(iter(missing.items()))
        raise DataError(f"{where} has no column '{theirs}' (config key '{key}.{ours}'); its columns: "
                        f"{', '.join(sorted(raw.column_names))}")
    renamed = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    in_the_way = [c for c in raw.column_names if c in renamed.values() and c not in renamed]
    return raw.remove_columns(in_the_way).rename_columns(renamed) if renamed else raw


def _is_dataset_repo(path: str) -> bool:
    """A folder that `datasets.load_dataset` reads as a dataset repo (README configs, data files),
    as opposed to one written by `save_to_disk` (state.json / dataset_dict.json)."""
    if not os.path.isdir(path):
        return False
    saved = ("dataset_dict.json", "state.json")
    return not any(os.path.exists(os.path.join(path, name)) for name in saved)


def _read_hub(src: DataSource, cache_dir: Optional[str], where: str) -> Any:
    """A Hub dataset at its pinned commit through `datasets.load_dataset`. Offline (HF_HUB_OFFLINE=1,
    or the Hub unreachable) datasets can reuse only what it prepared itself; a snapshot in the Hub
    cache (left by an earlier run, or `hf download --repo-type dataset`) is read as a local repo
    folder instead, which is the same files."""
    snapshot = cached_snapshot(src.name, "dataset", src.commit)
    if snapshot is not None and is_offline():
        return _load_dataset(src, where, cache_dir, snapshot)
    try:
        return _load_dataset(src, where, cache_dir, src.name, revision=src.commit or src.hub.revision)
    except _Unreachable as e:
        if snapshot is not None:
            return _load_dataset(src, where, cache_dir, snapshot)
        raise src.hub.not_cached(str(e)) from None


class _Unreachable(Exception):
    """The Hub could not be reached (or HF_HUB_OFFLINE=1) and datasets had nothing cached."""


def _load_dataset(src: DataSource, where: str, cache_dir: Optional[str], path: str,
                  revision: Optional[str] = None) -> Any:
    """`datasets.load_dataset(path, config, split)` with its failures as one sentence naming the key."""
    import datasets

    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        return datasets.load_dataset(path, name=src.config, split=src.split, revision=revision, cache_dir=cache_dir)
    except ConnectionError as e:
        raise _Unreachable(_one_line(e)) from None
    except Exception as e:
        text = _one_line(e).split(" Example of usage")[0]  # its example names the folder read, not the key
        if _is_split_error(e):
            raise DataError(f"{where}: {text} (config key '{src.split_key}')") from None
        if "BuilderConfig" in text or "Config name is missing" in text or "config" in text.lower() and src.config:
            raise DataError(f"{where}: {text} (config key '{src.config_key}')") from None
        if isinstance(e, FileNotFoundError) or type(e).__name__ in ("DataFilesNotFoundError", "EmptyDatasetError"):
            raise DataError(f"{where} is neither a saved HF dataset folder nor a dataset that datasets.load_dataset "
                            f"can read: {text}") from None
        raise DataError(f"{where} cannot be read: {text} (config key '{src.key}')") from None
    finally:
        ds_logger.setLevel(level)


def _is_split_error(e: Exception) -> bool:
    return isinstance(e, (ValueError, KeyError)) and "split" in str(e).lower()


def _raise_first_bad_json_line(path: str, where: str) -> None:
    """datasets does not say which line broke; find it ourselves (only on the failure path)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1).lstrip()
        f.seek(0)
        if head == "[":  # a JSON array file, not JSON lines
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: line {e.lineno} is not valid JSON ({e.msg})") from None
            if rows == []:
                raise DataError(f"{where} has no rows")
            return
        seen = False
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: line {lineno} is not a JSON object")
            seen = True
        if not seen:  # datasets fails on an empty file with a blank or cryptic message
            raise DataError(f"{where} has no rows")


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of everything that changes token ids: vocab, rules, specials, chat template."""
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "chat_template", "")), str(tokenizer.eos_token_id)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:
        parts.append(json.dumps(sorted(tokenizer.get_vocab().items())))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]
