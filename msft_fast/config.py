"""Run configuration: a YAML file plus dotted command-line overrides, parsed into dataclasses.

The key names are a contract (docs/config.md): add keys, never rename them.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from msft_fast.errors import ConfigError

BUILTIN_MODEL_PREFIX = "builtin:"
TASK_FIELDS = ("messages", "prompt", "completion", "text")  # the columns a task's formats read


@dataclass
class TaskConfig:
    """One sub-dataset of the mixture."""

    name: str
    train: str  # a file, a folder (saved dataset or dataset repo) or a Hub dataset id (org/name)
    val: Optional[str] = None  # the same kinds as train; or `val_split` of train; or hold out `val_fraction`
    val_fraction: Optional[float] = None
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto"
    split: str = "train"  # the split of `train` to train on (datasets' syntax: train, train[:90%], ...)
    val_split: Optional[str] = None  # the split of `val`; without `val`, a split of `train` (validation, test)
    config: Optional[str] = None  # the config (subset) of `train` when it is a Hub dataset or dataset repo folder
    revision: Optional[str] = None  # branch, tag or commit of `train` when it is a Hub dataset
    val_config: Optional[str] = None  # the same two for `val`, when it is a dataset of its own
    val_revision: Optional[str] = None
    columns: Optional[dict[str, str]] = None  # our field -> the dataset column: {prompt: question, completion: answer}
    # Exact match (msft.metric=val_exact_match): a regex applied to the generated and the reference
    # answer alike (its first group, else the whole match); null: msft.answer_pattern; "": none.
    answer_pattern: Optional[str] = None


@dataclass
class ModelConfig:
    path: str = "builtin:tiny-llama"  # a local HF model folder, a Hub repo id (org/name), or builtin:tiny-llama
    revision: Optional[str] = None  # branch, tag or commit of a Hub model; None: main
    attn_implementation: Literal["auto", "packed_sdpa", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    # The fused loss: auto = the chunked path on CUDA, the PyTorch reference on CPU (docs/loss-kernel.md)
    loss_impl: Literal["auto", "chunked", "triton", "torch"] = "auto"
    loss_chunk_mib: int = 1024  # memory budget of the chunked loss's transient buffers (kernels/chunk_plan.py)


@dataclass
class DataConfig:
    tasks: list[TaskConfig] = field(default_factory=list)
    max_seq_len: int = 2048  # longest document, in tokens
    tokens_per_batch: int = 8192  # tokens per packed micro-batch per rank
    overlong: Literal["truncate", "drop"] = "truncate"
    split_seed: int = 0  # held-out validation rows for `val_fraction` tasks
    cache_dir: Optional[str] = None  # HF datasets cache; None = HF's default
    num_proc: Optional[int] = None  # tokenization workers; None = one process
    chat_template: Optional[str] = None  # a Jinja file or inline template replacing the tokenizer's (and final/'s)
    empty_think_blocks: Literal["train", "prompt", "strip"] = "train"  # empty <think></think> in assistant turns
    static_shapes: Optional[bool] = None  # pad rows to tokens_per_batch rounded up to 128; null: where compiled


@dataclass
class TrainConfig:
    lr: float = 1e-4
    epochs: float = 3.0
    seed: int = 0
    grad_accum: int = 1
    grad_sync: Literal["step", "micro_batch"] = "step"  # gradient reduce-scatter once per step, or per micro-batch
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio for cosine/linear
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    log_every: int = 1
    progress: bool = True  # a progress bar on a terminal; elsewhere (a log file, a pipe) periodic lines
    progress_interval: float = 30.0  # seconds between progress lines when stderr is not a terminal
    activation_checkpointing: Literal["off", "full", "selective"] = "off"  # selective: every n-th block
    activation_checkpointing_every: int = 2  # n for selective
    compile: bool = False  # torch.compile each decoder block
    hsdp_replicas: int = 1  # >1: HSDP, replicate over this many groups (nodes), shard within each
    fsdp: Literal["auto", "always"] = "auto"  # auto: no FSDP2 for one CPU process in fp32 (nothing to shard)
    peak_tflops: Optional[float] = None  # one device's peak for MFU; None: the table for known GPUs
    checkpoint_every: int = 500  # optimizer steps between resumable checkpoints; 0 = none
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    checkpoint_async: bool = False  # write checkpoint shards in a background thread while training goes on
    max_bad_steps: int = 3  # non-finite steps in a row (each skipped) before `on_bad_steps` acts
    on_bad_steps: Literal["stop", "restore"] = "stop"  # restore: newest checkpoint's weights and optimizer
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # experiment trackers; [] = none


@dataclass
class MsftConfig:
    budget_epochs: float = 1.0  # C: epochs of the active mixture per roll-out
    evals_per_epoch: int = 4  # every method evaluates this often, plus at each stage start
    max_stages: int = 20  # roll-outs at most (a roll-out that excludes nothing counts too)
    # Compute bound: epochs trained over all stages, kept and discarded (each step counts 1/steps of
    # an epoch of the mixture active then). None: 2 x train.epochs; inf: no bound (the paper's loop).
    max_epochs: Optional[float] = None
    max_stale_stages: Optional[int] = None  # stop after this many stages in a row without a better pooled eval
    metric: str = "val_loss"  # val_loss | val_token_acc | val_exact_match | module:function (higher is better)
    tie_break: Literal["most_overfit", "first"] = "most_overfit"  # among tasks peaking at the same evaluation
    # A task's peak among evaluations of equal best metric: the latest (a flat curve has not peaked)
    # or the earliest (the paper's raw argmax: exact match stuck at 0 "peaks" at the stage start).
    peak_ties: Literal["latest", "earliest"] = "latest"
    restore: Literal["full", "weights"] = "full"  # full: weights+optimizer+schedule+data+RNG; weights: fresh optimizer
    patience: Optional[int] = None  # end a roll-out once the earliest peak has held for this many evaluations
    snapshot_spill_dir: Optional[str] = None  # where older snapshot states go when host memory cannot hold them all
    # A task has peaked before the roll-out's end only if its latest metric is worse than its best
    # by more than this; 0: any earlier best counts (with peak_ties=earliest, the paper's raw argmax).
    min_delta: float = 0.0
    # Exact match of generated answers (metric val_exact_match, or report_exact_match with another metric)
    report_exact_match: bool = False  # also score generated answers when selecting by another metric
    answer_pattern: Optional[str] = None  # default of data.tasks[i].answer_pattern, e.g. '####\s*(.+)'
    max_new_tokens: Optional[int] = None  # null: per task, its longest reference answer (with its stop token)
    generation_tokens_per_batch: Optional[int] = None  # rows x (longest prompt + max_new_tokens); null: data's
    generation_gather: Literal["auto", "once", "per_forward"] = "auto"  # how generation gets the sharded weights


@dataclass
class IesConfig:
    """Instance-dependent early stopping (Yuan et al., ICLR 2025; their code's defaults)."""

    threshold: float = 1e-3  # a document is mastered once its smoothed |second difference of loss| is below this
    window: int = 3  # second differences averaged per window (the reference's --moving_average_rate)
    k: int = 1  # newest windows summed against the threshold (the reference's --k)


@dataclass
class DynamixConfig:
    """DynamixSFT (Shin et al., arXiv 2508.12116). Defaults as read from the paper for its 1B model;
    not re-checked against its full text (docs/methods.md)."""

    beta: float = 4.0  # Boltzmann sharpness on the reward estimates Q
    gamma: float = 0.3  # share of the sampling mass spread uniformly over the tasks (exploration floor)
    alpha: float = 0.95  # EMA weight of the old Q against the new normalised reward
    update_every: int = 50  # optimizer steps between look-ahead reward updates (T_update)
    epsilon: float = 1e-8  # in the relative loss drop (L_pre - L_post) / (L_pre + epsilon)


@dataclass
class Config:
    output_dir: str
    method: Literal["sft", "msft", "sro", "ies", "dynamix"] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    msft: MsftConfig = field(default_factory=MsftConfig)
    ies: IesConfig = field(default_factory=IesConfig)
    dynamix: DynamixConfig = field(default_factory=DynamixConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Read `path` (YAML), apply `a.b=value` / `a.list[i].b=value` overrides (values parsed as
    YAML), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder, not a YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_one_line(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    _report_to_as_list(raw)
    if path is None and ("output_dir" not in raw or not (raw.get("data") or {}).get("tasks")):
        # Without a file the overrides must say it all; naming the first missing key would hide
        # that the file itself was forgotten.
        raise ConfigError("no config file given: run `msft-fast train --config FILE.yaml [key=value ...]` "
                          "(without --config the overrides must set at least output_dir and data.tasks)")
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


_INDEXED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[-?\d+\])*)$")


def _apply_override(raw: dict, item: str) -> None:
    """`a.b=v` sets a key; `data.tasks[0].train=v` reaches into a list that the config already has."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML: {_one_line(e)}") from None
    # The path as steps: a key name, or an index into the list that the previous step reached.
    steps: list[str | int] = []
    for part in key.split("."):
        m = _INDEXED.match(part)
        if m is None:
            raise ConfigError(f"override '{item}': '{part}' is not a key name (or name[index])")
        steps.append(m.group(1))
        steps += [int(i) for i in re.findall(r"-?\d+", m.group(2))]
    node: Any = raw
    where = ""
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if isinstance(step, int):
            if not isinstance(node, list):
                raise ConfigError(f"override '{item}': {where} is not a list, so it has no [{step}]")
            if not 0 <= step < len(node):
                have = f"indexes 0 to {len(node) - 1}" if node else "none"
                raise ConfigError(f"override '{item}': {where} has {len(node)} entries ({have}); "
                                  f"set the whole list with {where}=[...] to add one")
            if last:
                node[step] = value
            elif not isinstance(node[step], dict):
                raise ConfigError(f"override '{item}': {where}[{step}] is not a section")
            node, where = node[step], f"{where}[{step}]"
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': {where} is not a section")
        name = f"{where}.{step}" if where else step
        if last:
            node[step] = value
        elif isinstance(steps[i + 1], int):
            if step not in node or node[step] is None:
                raise ConfigError(f"override '{item}': {name} is not set, so it has no [{steps[i + 1]}]; "
                                  f"set the whole list with {name}=[...]")
        else:
            if node.get(step) is None:
                node[step] = {}
            if not isinstance(node[step], dict):
                raise ConfigError(f"override '{item}': {name} is not a section")
        node, where = node.get(step), name


def _report_to_as_list(raw: dict) -> None:
    """train.report_to also takes one name, or `none`, as HF's TrainingArguments does."""
    train = raw.get("train")
    if isinstance(train, dict) and isinstance(train.get("report_to"), str):
        train["report_to"] = [] if train["report_to"] == "none" else [train["report_to"]]


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_suggest(prefix, str(key), fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{prefix}{name}' is required")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_convert(args[0], k, key): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _suggest(prefix: str, key: str, fields: dict) -> str:
    """A key that exists, under that name, in another section (`lr` -> `train.lr`, `train.budget_epochs`
    -> `msft.budget_epochs`) is the likeliest meaning; else the closest name at the same level."""
    elsewhere = [f"{section}.{key}" for section, names in _section_keys().items()
                 if key in names and f"{section}." != prefix]
    if not prefix and key in {f.name for f in dataclasses.fields(TaskConfig)}:
        elsewhere.append(f"data.tasks[i].{key}")
    if elsewhere:
        return " (did you mean " + " or ".join(f"'{k}'" for k in elsewhere) + "?)"
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _section_keys() -> dict[str, list[str]]:
    """Key names of each top-level section (model, data, train, msft, ies, dynamix)."""
    hints = typing.get_type_hints(Config)
    return {f.name: [g.name for g in dataclasses.fields(hints[f.name])]
            for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# ---------------------------------------------------------------------------------------------
# Value checks that types alone cannot express


def validate(cfg: Config) -> None:
    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")

    _check_not_placeholder(cfg)
    need(bool(cfg.output_dir), "output_dir", "a folder path", cfg.output_dir)
    need(bool(cfg.model.path), "model.path", f"a model folder or {BUILTIN_MODEL_PREFIX}tiny-llama", cfg.model.path)
    need(cfg.model.loss_chunk_mib >= 1, "model.loss_chunk_mib", "at least 1 (MiB)", cfg.model.loss_chunk_mib)
    d, t, m = cfg.data, cfg.train, cfg.msft
    need(len(d.tasks) > 0, "data.tasks", "a non-empty list of {name, train, val | val_fraction}", d.tasks)
    seen: set[str] = set()
    for i, task in enumerate(d.tasks):
        key = f"data.tasks[{i}]"
        need(bool(task.name.strip()), f"{key}.name", "a non-empty name", task.name)
        if task.name in seen:
            raise ConfigError(f"config key '{key}.name': task name '{task.name}' is used twice")
        seen.add(task.name)
        given = task.val is not None or task.val_split is not None  # val, val_split or both
        if given == (task.val_fraction is not None):
            raise ConfigError(f"config key '{key}' (task '{task.name}') needs exactly one of 'val' or 'val_fraction'"
                              " ('val_split' counts as 'val': a split of val, or of train when val is not set)")
        need(bool(task.split), f"{key}.split", "a split name such as train", task.split)
        for ours in task.columns or {}:
            need(ours in TASK_FIELDS, f"{key}.columns", f"a mapping from {', '.join(TASK_FIELDS)} to column names",
                 task.columns)
        if task.val_fraction is not None:
            need(0.0 < task.val_fraction < 1.0, f"{key}.val_fraction", "in (0, 1)", task.val_fraction)
    need(d.max_seq_len >= 2, "data.max_seq_len", "at least 2", d.max_seq_len)
    need(d.tokens_per_batch >= 1, "data.tokens_per_batch", "a positive number of tokens", d.tokens_per_batch)
    if d.tokens_per_batch < d.max_seq_len:
        raise ConfigError(
            f"config key 'data.tokens_per_batch' ({d.tokens_per_batch}) must be at least "
            f"data.max_seq_len ({d.max_seq_len}) so that every document fits in one micro-batch"
        )
    need(d.num_proc is None or d.num_proc >= 1, "data.num_proc", "at least 1", d.num_proc)
    need(d.split_seed >= 0, "data.split_seed", "0 or more", d.split_seed)  # numpy seeds are non-negative
    need(t.seed >= 0, "train.seed", "0 or more", t.seed)
    need(t.lr > 0 and _finite(t.lr), "train.lr", "a positive number", t.lr)
    need(t.epochs > 0 and _finite(t.epochs), "train.epochs", "a positive number", t.epochs)
    need(t.grad_accum >= 1, "train.grad_accum", "at least 1", t.grad_accum)
    need(t.warmup_steps >= 0, "train.warmup_steps", "0 or more", t.warmup_steps)
    need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "in [0, 1]", t.min_lr_ratio)
    need(t.weight_decay >= 0, "train.weight_decay", "0 or more", t.weight_decay)
    need(0.0 <= t.beta1 < 1.0, "train.beta1", "in [0, 1)", t.beta1)
    need(0.0 <= t.beta2 < 1.0, "train.beta2", "in [0, 1)", t.beta2)
    need(t.grad_clip >= 0, "train.grad_clip", "0 (off) or a positive norm", t.grad_clip)
    need(t.log_every >= 1, "train.log_every", "at least 1", t.log_every)
    need(t.progress_interval > 0, "train.progress_interval", "a positive number of seconds", t.progress_interval)
    need(t.activation_checkpointing_every >= 1, "train.activation_checkpointing_every", "at least 1",
         t.activation_checkpointing_every)
    need(t.hsdp_replicas >= 1, "train.hsdp_replicas", "at least 1", t.hsdp_replicas)
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "0 (off) or a number of steps", t.checkpoint_every)
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "at least 1", t.keep_checkpoints)
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "at least 1", t.max_bad_steps)
    need(m.budget_epochs > 0 and _finite(m.budget_epochs), "msft.budget_epochs", "a positive number", m.budget_epochs)
    need(m.evals_per_epoch >= 1, "msft.evals_per_epoch", "at least 1", m.evals_per_epoch)
    need(m.max_stages >= 1, "msft.max_stages", "at least 1", m.max_stages)
    need(m.max_epochs is None or m.max_epochs > 0, "msft.max_epochs",  # NaN fails too
         "a positive number of epochs, inf (no bound) or null (2 x train.epochs)", m.max_epochs)
    need(m.max_stale_stages is None or m.max_stale_stages >= 1, "msft.max_stale_stages", "null (off) or at least 1",
         m.max_stale_stages)
    need(m.patience is None or m.patience >= 1, "msft.patience", "null (off) or at least 1", m.patience)
    ies, dx = cfg.ies, cfg.dynamix
    need(ies.threshold > 0 and _finite(ies.threshold), "ies.threshold", "a positive number", ies.threshold)
    need(ies.window >= 1, "ies.window", "at least 1", ies.window)
    need(ies.k >= 1, "ies.k", "at least 1", ies.k)
    need(dx.beta >= 0 and _finite(dx.beta), "dynamix.beta", "0 or a positive number", dx.beta)
    need(0.0 <= dx.gamma <= 1.0, "dynamix.gamma", "in [0, 1]", dx.gamma)
    need(0.0 <= dx.alpha < 1.0, "dynamix.alpha", "in [0, 1)", dx.alpha)
    need(dx.update_every >= 1, "dynamix.update_every", "at least 1 (optimizer steps)", dx.update_every)
    need(dx.epsilon > 0 and _finite(dx.epsilon), "dynamix.epsilon", "a positive number", dx.epsilon)
    builtin_metric = m.metric in BUILTIN_METRICS
    module, sep, func = m.metric.partition(":")
    need(builtin_metric or (sep and module and func), "msft.metric",
         "val_loss, val_token_acc, val_exact_match or a callback 'module:function'", m.metric)
    need(m.min_delta >= 0 and _finite(m.min_delta), "msft.min_delta", "0 or a positive number", m.min_delta)
    need(m.max_new_tokens is None or m.max_new_tokens >= 1, "msft.max_new_tokens", "null (from the references) or "
         "at least 1", m.max_new_tokens)
    need(m.generation_tokens_per_batch is None or m.generation_tokens_per_batch >= 1, "msft.generation_tokens_per_batch",
         "null (data.tokens_per_batch) or a positive number of tokens", m.generation_tokens_per_batch)
    _check_pattern(m.answer_pattern, "msft.answer_pattern")
    for i, task in enumerate(d.tasks):
        _check_pattern(task.answer_pattern, f"data.tasks[{i}].answer_pattern")


BUILTIN_METRICS = ("val_loss", "val_token_acc", "val_exact_match")


def scores_exact_match(cfg: Config) -> bool:
    """Whether evaluations generate answers and score them by exact match."""
    return cfg.msft.metric == "val_exact_match" or cfg.msft.report_exact_match


# A template config (configs/paper.yaml) marks what the user must fill in as `<...>`.
_PLACEHOLDER = re.compile(r"^<[^<>]*>$")


def _check_not_placeholder(cfg: Config) -> None:
    values = [("output_dir", cfg.output_dir), ("model.path", cfg.model.path)]
    for i, t in enumerate(cfg.data.tasks):
        values += [(f"data.tasks[{i}].{k}", getattr(t, k)) for k in ("name", "train", "val")]
    for key, value in values:
        if isinstance(value, str) and _PLACEHOLDER.match(value.strip()):
            raise ConfigError(f"config key '{key}' is still the placeholder {value!r} of a template config: set it "
                              f"in your copy of the file, or override it ({key}=...)")


def _check_pattern(pattern: Optional[str], key: str) -> None:
    if pattern:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config key '{key}' ('{pattern}') is not a valid regular expression: {e}") from None


def max_trained_epochs(cfg: Config) -> float:
    """mSFT's compute bound in epochs (msft.max_epochs; null: 2 x train.epochs; inf: none)."""
    m = cfg.msft.max_epochs
    return 2.0 * cfg.train.epochs if m is None else m


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def resolve_path(path: str) -> str:
    """Paths in a config are relative to the working directory the command runs in."""
    return os.path.abspath(os.path.expanduser(path))
