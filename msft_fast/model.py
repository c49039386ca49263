"""The HF causal LM, and the module that turns a packed batch into a summed loss with per-task stats.

The loss is computed from the final hidden states and the LM-head weight by the fused kernel, so
the [N, V] logits of a batch never exist. It runs inside `CausalLMWithTaskLoss.forward`, which
FSDP2 manages as the root module: the head weight is unsharded there and its gradient is
reduce-scattered as usual (reading it outside a managed forward is a known FSDP trap).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from msft_fast.attention import FLEX_ATTENTION, PACKED_SDPA, packed_attention_inputs
from msft_fast.builtin import BUILTIN_MODELS, char_tokenizer, tiny_llama_config
from msft_fast.config import BUILTIN_MODEL_PREFIX, ModelConfig, resolve_path
from msft_fast.data.chat_template import override_chat_template
from msft_fast.data.packing import PackedBatch
from msft_fast.errors import ConfigError, ModelError
from msft_fast.flops import LINEAR_TIME_LAYER_TYPES, SLIDING_LAYER_TYPES
from msft_fast.hub import model_snapshot, model_source
from msft_fast.kernels import TaskStats, fused_linear_cross_entropy, loss_memory_bytes, plan_chunks
from msft_fast.kernels.fp32_gemm import require_fp32_output
from msft_fast.kernels.fused_linear_cross_entropy import choose_backend

log = logging.getLogger("msft_fast")



@dataclass
class LoadedModel:
    model: nn.Module  # an HF *ForCausalLM, fp32 master weights, on CPU
    tokenizer: Any
    source: str  # the folder it came from, the Hub repo id, or builtin:NAME
    attn_implementation: str
    export_dtype: torch.dtype  # the dtype the weights came in; final/ is saved in it
    compute_dtype: torch.dtype  # forward/backward dtype (FSDP param_dtype); masters stay fp32


@dataclass(frozen=True)
class LossOptions:
    """How CausalLMWithTaskLoss computes its loss: config keys model.loss_impl and model.loss_chunk_mib."""

    impl: str = "auto"
    chunk_bytes: int | None = None  # None: the kernels' default budget

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "LossOptions":
        return cls(cfg.loss_impl, cfg.loss_chunk_mib * 2**20)


def compute_dtype_for(precision: str, device: torch.device) -> torch.dtype:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


@dataclass
class ModelSpec:
    """What a run needs to know about its model before any weight is read: tokenizer, HF config,
    attention backend and dtypes. Data and memory are checked against it first."""

    tokenizer: Any
    config: Any  # the HF PretrainedConfig
    source: str  # the folder, the Hub repo id, or builtin:NAME
    path: str | None  # the local folder (a Hub model's snapshot in the cache); None for a built-in model
    attn_implementation: str
    export_dtype: torch.dtype
    compute_dtype: torch.dtype
    commit: Optional[str] = None  # a Hub model's commit

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config


def check_loss_impl(loss_impl: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuses, before anything loads, a fused loss (model.loss_impl) that cannot run here as it should:
    Triton kernels on a CPU outside the interpreter, or 16-bit logits that this torch would round."""
    backend = choose_backend(loss_impl, device, dtype)
    if backend in ("chunked", "triton") and device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ConfigError(f"config key 'model.loss_impl' ({loss_impl}) runs Triton kernels, which need a CUDA "
                          f"device (this run is on {device.type}); use auto or torch")
    if backend in ("chunked", "triton") and dtype != torch.float32:
        try:
            require_fp32_output(device)
        except RuntimeError as e:
            raise ConfigError(f"config key 'model.loss_impl' ({loss_impl}): {e}; upgrade torch or set "
                              f"model.loss_impl=torch") from None


def load_model_spec(cfg: ModelConfig, precision: str, device: torch.device,
                    chat_template: Optional[str] = None, commits: Optional[dict] = None) -> ModelSpec:
    """Tokenizer and config of `cfg.path` (or of the built-in tiny model); no weights yet.

    chat_template: `data.chat_template` (a Jinja file or inline template), which then replaces the
    tokenizer's own for the data, the evaluation and the exported final/.
    commits: `hub.pin_commits` of the run (a Hub model is read at commits["model.path"]); None: pin here.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype = compute_dtype_for(precision, device)
    check_loss_impl(cfg.loss_impl, device, dtype)
    if cfg.path.startswith(BUILTIN_MODEL_PREFIX):
        name = cfg.path[len(BUILTIN_MODEL_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ConfigError(f"config key 'model.path': unknown built-in model '{name}' (known: {', '.join(BUILTIN_MODELS)})")
        tokenizer = char_tokenizer()
        override_chat_template(tokenizer, chat_template)
        config = tiny_llama_config(len(tokenizer))
        attn = choose_attention(cfg.attn_implementation, device, dtype, causal_lm_class(config), config)
        config._attn_implementation = attn
        return ModelSpec(tokenizer, config, cfg.path, None, attn, torch.float32, dtype)

    hub = model_source(cfg)
    if hub is None:
        path, source, commit = resolve_path(cfg.path), resolve_path(cfg.path), None
    else:
        commit = commits.get("model.path") if commits is not None else hub.pin()
        path, source = model_snapshot(hub, commit), hub.repo_id
    _check_model_folder(path)
    # Whatever HF raises here (OSError, ValueError, an ImportError for a missing tokenizer backend)
    # is a problem of the folder: one sentence. What HF logs on the way is held back, and passed on
    # only when loading succeeds.
    hf_logging.get_verbosity()  # HF adds its log handler on first use: let that happen before holding
    with _held_logs("transformers") as held:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            config = AutoConfig.from_pretrained(path)
        except Exception as e:
            raise ModelError(f"cannot load the model folder {path}: {_short(e)}") from None
        held.pass_on()
    override_chat_template(tokenizer, chat_template)
    attn = choose_attention(cfg.attn_implementation, device, dtype, causal_lm_class(config), config)
    return ModelSpec(tokenizer, config, source, path, attn, _config_dtype(config), dtype, commit)


def load_model(cfg: ModelConfig, precision: str, device: torch.device, seed: int,
               spec: ModelSpec | None = None) -> LoadedModel:
    """Load the model of `spec` (read from `cfg` if not given) on the CPU, in fp32."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    spec = spec or load_model_spec(cfg, precision, device)
    attn, dtype = spec.attn_implementation, spec.compute_dtype
    if spec.path is None:
        torch.manual_seed(seed)  # the built-in model's random init is part of the run's seed
        model = AutoModelForCausalLM.from_config(spec.config, attn_implementation=attn, dtype=torch.float32)
        return LoadedModel(model, spec.tokenizer, spec.source, _used_attention(model), torch.float32, dtype)

    path = spec.path
    hf_logging.get_verbosity()
    with _held_logs("transformers") as held:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, config=spec.config, dtype=torch.float32, attn_implementation=attn, output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, in one sentence
            )
        except Exception as e:
            raise ModelError(f"cannot load the model folder {path}: {_short(e)}") from None
        _check_loading_info(info, path)
        held.pass_on()
    model.config.dtype = spec.export_dtype  # we train fp32 master weights; the saved config keeps its dtype
    _check_head(model, path)
    return LoadedModel(model, spec.tokenizer, spec.source, _used_attention(model), spec.export_dtype, dtype)


@dataclass(frozen=True)
class HeadTransform:
    """What the model does to `hidden @ head.weight.T` before the softmax, applied by the loss:
    Gemma-2 soft-capping, Cohere's logit_scale (multiply), Granite's logits_scaling (divide),
    and an LM-head bias (Phi-2)."""

    softcap: float | None = None
    scale: float = 1.0  # folded into the hidden states: (s*h) @ W.T == s * (h @ W.T)

    @classmethod
    def of(cls, model: nn.Module) -> "HeadTransform":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        softcap = getattr(config, "final_logit_softcapping", None)
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        scaling = getattr(config, "logits_scaling", None)
        if scaling not in (None, 0):
            scale /= float(scaling)
        return cls(float(softcap) if softcap else None, scale)


def _check_head(model: nn.Module, path: str) -> None:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelError(f"the model in {path} has no linear LM head")
    if getattr(head, "bias", None) is not None and HeadTransform.of(model).scale != 1.0:
        # Scaling the hidden states would leave the bias unscaled; no known model has both.
        raise ModelError(f"the model in {path} has both an LM-head bias and a logit scale, which the loss does not support")


def _config_dtype(config: Any) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def _check_model_folder(path: str) -> None:
    if not os.path.exists(path):
        raise ModelError(f"model folder {path} does not exist (config key 'model.path')")
    if not os.path.isdir(path):
        raise ModelError(f"model folder {path} is a file, not a folder (config key 'model.path')")
    try:
        files = os.listdir(path)
    except OSError as e:
        raise ModelError(f"model folder {path} cannot be read ({e.strerror})") from None
    if "config.json" not in files:
        raise ModelError(f"model folder {path} has no config.json")
    if not any(f.endswith(".safetensors") or f.endswith(".bin") for f in files):
        raise ModelError(f"model folder {path} has no weights (*.safetensors)")
    if not any(f in files for f in _TOKENIZER_FILES):
        raise ModelError(f"model folder {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_loading_info(info: dict, path: str) -> None:
    """HF starts missing or wrongly shaped weights from random values and only warns: refuse instead."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shown = ", ".join(f"{k}: checkpoint {list(a)}, config {list(b)}" for k, a, b in mismatched[:2])
        raise ModelError(f"the model folder {path} has {len(mismatched)} weight(s) whose shape does not match its "
                         f"config.json ({shown}{', ...' if len(mismatched) > 2 else ''})")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(f"the model folder {path} has no weights for {len(missing)} parameter(s) "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): its checkpoint "
                         "is incomplete or for another architecture")


class _HeldRecords(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.targets: list[logging.Handler] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def pass_on(self) -> None:
        """Pass the held records on to the logger's own handlers (called when loading succeeded)."""
        for record in self.records:
            for handler in self.targets:
                if record.levelno >= handler.level:
                    handler.handle(record)
        self.records = []


@contextlib.contextmanager
def _held_logs(name: str):
    """Hold what logger `name` emits inside the block; records not passed on (`pass_on()`) are dropped."""
    logger = logging.getLogger(name)
    held = _HeldRecords()
    saved = logger.handlers[:], logger.propagate
    held.targets = saved[0] or logging.getLogger().handlers
    logger.handlers, logger.propagate = [held], False
    try:
        yield held
    finally:
        logger.handlers, logger.propagate = saved


def _short(e: BaseException, limit: int = 300) -> str:
    """An exception as one line: ANSI colours dropped, cut at a sentence end near `limit`."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split()) or type(e).__name__
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > limit // 3 else text[:limit] + "..."


@dataclass(frozen=True)
class AttentionSetting:
    """What decides which attention backends can train: the device, the compute dtype, the HF
    model class (None when unknown: then only the device and installed packages decide) and its
    config (sliding windows, soft-capping, ...: for backends that apply to some models only)."""

    device: torch.device
    dtype: torch.dtype
    model_class: Optional[type] = None
    config: Any = None

    def model_lacks(self, flag: str) -> bool:
        """The model class says it does not support a backend (HF's `_supports_sdpa`, ...)."""
        return self.model_class is not None and not getattr(self.model_class, flag, False)

    @property
    def model_name(self) -> str:
        return self.model_class.__name__ if self.model_class is not None else "the model"

    @property
    def text_config(self) -> Any:
        """The (text) config: the one given, else the model class's defaults (None if neither)."""
        config = self.config
        if config is None and self.model_class is not None:
            try:
                config = self.model_class.config_class()
            except Exception:  # a config class that needs arguments: nothing to read
                return None
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def softcapped(self) -> bool:
        """The model soft-caps its attention logits (Gemma 2), which no SDPA kernel can do. HF's own
        `_supports_sdpa` says so only in recent releases (transformers 5.0 still allows SDPA there)."""
        return bool(getattr(self.text_config, "attn_logit_softcapping", None))


@dataclass(frozen=True)
class AttentionBackend:
    """One value of `model.attn_implementation`: the HF attn_implementation it sets up, and why it
    cannot train in a given setting (None: it can). All keep packed documents apart (attention.py)."""

    name: str
    hf_name: str
    unusable: Callable[[AttentionSetting], Optional[str]]


def _flash_unusable(s: AttentionSetting) -> Optional[str]:
    if s.device.type != "cuda" or s.dtype == torch.float32 or importlib.util.find_spec("flash_attn") is None:
        return ("flash_attention_2 needs CUDA, bf16 compute (train.precision) and the flash-attn package "
                "(pip install 'msft-fast[gpu]')")
    if s.model_lacks("_supports_flash_attn") or s.model_lacks("_supports_attention_backend"):
        return f"flash_attention_2 is not supported by {s.model_name} (HF marks it so)"
    return None


def _flex_unusable(s: AttentionSetting) -> Optional[str]:
    if s.device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return ("flex_attention needs CUDA and Triton (PyTorch has no FlexAttention backward on CPU, and "
                "training needs one)")
    # Ours is a registered attention function: the model's layers must call through HF's interface.
    if s.model_lacks("_supports_flex_attn") or s.model_lacks("_supports_attention_backend"):
        return f"flex_attention is not supported by {s.model_name} (HF marks it so)"
    return None


# Layer kinds whose attention is fully described by causal masking within a document and the
# `sliding_window` HF passes to the attention function; the others ignore attention entirely.
_BUCKETED_LAYER_TYPES = ("full_attention",) + SLIDING_LAYER_TYPES + LINEAR_TIME_LAYER_TYPES


def _packed_sdpa_unusable(s: AttentionSetting) -> Optional[str]:
    # Ours is a registered attention function: the model's layers must call through HF's interface,
    # and SDPA must suit the model (no soft-capping, no sinks: what HF's _supports_sdpa says).
    if s.model_lacks("_supports_sdpa") or s.model_lacks("_supports_attention_backend"):
        return f"packed_sdpa is not supported by {s.model_name} (HF marks it so)"
    config = s.text_config
    if s.softcapped():
        return f"packed_sdpa has no attention logit soft-capping, which {s.model_name} uses"
    if getattr(config, "attention_chunk_size", None):
        return f"packed_sdpa has no chunked attention, which {s.model_name} uses"
    other = sorted(set(getattr(config, "layer_types", None) or ()) - set(_BUCKETED_LAYER_TYPES))
    if other:
        return f"packed_sdpa does not know the attention of {s.model_name}'s {', '.join(other)} layers"
    return None


def _sdpa_unusable(s: AttentionSetting) -> Optional[str]:
    if s.model_lacks("_supports_sdpa"):  # e.g. Gemma 2: SDPA has no attention-logit soft-capping
        return f"sdpa is not supported by {s.model_name} (HF marks it so)"
    if s.softcapped():
        return f"sdpa has no attention logit soft-capping, which {s.model_name} uses"
    return None


# `auto` takes the first backend that can train here, so they are listed best first; adding a
# backend is one more line (and its value in config.ModelConfig.attn_implementation).
ATTENTION_BACKENDS = (
    AttentionBackend("flash_attention_2", "flash_attention_2", _flash_unusable),  # varlen, bf16/fp16
    # Before FlexAttention: nothing in it is compiled, so no shape can trigger a recompile or fall back
    # to eager flex (which materialises the scores); FlexAttention stays the choice where SDPA cannot
    # mask the model (soft-capping) and is measured beside it by bench/gpu_check.sh.
    AttentionBackend("packed_sdpa", PACKED_SDPA, _packed_sdpa_unusable),  # SDPA per length bucket, no [N, N] mask
    AttentionBackend("flex_attention", FLEX_ATTENTION, _flex_unusable),  # document block mask, any dtype
    AttentionBackend("sdpa", "sdpa", _sdpa_unusable),  # dense document mask from position_ids
    AttentionBackend("eager", "eager", lambda s: None),  # every HF model has it
)


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype,
                     model_class: Optional[type] = None, config: Any = None) -> str:
    """The HF attn_implementation for `model.attn_implementation` (see msft_fast/attention.py).

    auto: the first of ATTENTION_BACKENDS that can train with this device, compute dtype, installed
    packages and model class: flash-attn varlen on CUDA in bf16/fp16 when installed, else SDPA
    over length buckets of documents, else FlexAttention on CUDA (soft-capped models such as
    Gemma 2), else SDPA with a dense document mask, else eager (Gemma 2 on a CPU). A named backend that cannot train here is
    refused with one sentence that lists the values that can.
    """
    setting = AttentionSetting(device, dtype, model_class, config)
    usable = [b for b in ATTENTION_BACKENDS if b.unusable(setting) is None]
    if requested == "auto":
        return usable[0].hf_name
    backend = next((b for b in ATTENTION_BACKENDS if b.name == requested), None)
    if backend is None:
        raise ConfigError(f"config key 'model.attn_implementation' must be auto or one of "
                          f"{', '.join(b.name for b in ATTENTION_BACKENDS)}, got {requested!r}")
    why = backend.unusable(setting)
    if why is not None:
        choices = ", ".join([f"auto (picks {usable[0].name})"] + [b.name for b in usable])
        raise ConfigError(f"config key 'model.attn_implementation': {why}; values that work for "
                          f"{setting.model_name} here: {choices}")
    return backend.hf_name


def causal_lm_class(config: Any) -> Optional[type]:
    """The HF *ForCausalLM class AutoModelForCausalLM builds for `config` (None if it has none)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def _used_attention(model: nn.Module) -> str:
    """The backend HF actually set up, which is what gets logged (HF may swap flash_attention_2 for
    a kernels-hub build of it)."""
    return str(model.config._attn_implementation)


def max_positions(config: Any) -> int | None:
    """The position limit of an HF config (None when it has none)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found by the class names HF marks as not splittable."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ModelError(f"cannot find the decoder blocks of {type(model).__name__} to shard")
    return blocks


class CausalLMWithTaskLoss(nn.Module):
    """Wraps an HF causal LM: packed batch in, (summed token loss, per-task stats) out."""

    def __init__(self, lm: nn.Module, num_tasks: int, loss_options: LossOptions | None = None):
        super().__init__()
        self.lm = lm
        self.num_tasks = num_tasks
        # Given, or what load_model attached to the HF model, or the defaults.
        self.loss_options = loss_options or LossOptions()
        self._loss_logged: set[bool] = set()  # training and evaluation each say once which loss path runs
        self.head_transform = HeadTransform.of(lm)
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.sliding_window = getattr(config, "sliding_window", None)  # FlexAttention needs a mask for it
        heads = config.num_attention_heads
        self.attn_width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)  # sizes buckets

    def forward(self, batch: PackedBatch, per_document: bool = False):
        """(summed token loss, TaskStats [T]); with `per_document`, also TaskStats [D] of each of the
        batch's D documents, from the same loss pass: the kernel then sums per document (documents
        as its "tasks") and the per-task sums are folded from those."""
        hidden = self.hidden_states(batch)
        head, t = self.lm.get_output_embeddings(), self.head_transform
        if t.scale != 1.0:
            hidden = hidden * t.scale
        o = self.loss_options
        if torch.is_grad_enabled() not in self._loss_logged:
            self._loss_logged.add(torch.is_grad_enabled())
            self._log_loss_plan(hidden, head.weight)
        if per_document:
            group_ids, groups = batch.document_ids()
        else:
            group_ids, groups = batch.task_ids, None
        loss, stats = fused_linear_cross_entropy(
            hidden, head.weight, batch.labels, group_ids, self.num_tasks if groups is None else len(groups),
            reduction="sum", impl=o.impl, bias=getattr(head, "bias", None), softcap=t.softcap,
            chunk_bytes=o.chunk_bytes,
            # Counted on the host while packing, and every id checked at load: no host sync here.
            num_valid=batch.num_loss_tokens,
        )
        if groups is None:
            return loss, stats
        tasks = TaskStats(*(s.new_zeros(self.num_tasks).index_add_(0, groups, s) for s in stats))
        if batch.filler_docs:  # static shapes' filler documents (no labels) are not the plan's
            stats = TaskStats(*(s[:batch.real_docs] for s in stats))
        return loss, tasks, stats

    def loss_implementation(self, device: torch.device, dtype: torch.dtype) -> str:
        """The loss backend forward runs on hidden states of this device and dtype ("chunked",
        "triton" or "torch"), as fused_linear_cross_entropy picks it for model.loss_impl."""
        return choose_backend(self.loss_options.impl, device, dtype)

    def _log_loss_plan(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        """Say which loss path runs and the memory it takes at this micro-batch size (training or evaluation)."""
        o, (n, h), v = self.loss_options, hidden.shape, weight.shape[0]
        backend = choose_backend(o.impl, hidden.device, hidden.dtype)
        how = ""
        if backend == "chunked":
            p = plan_chunks(n, v, hidden.dtype, torch.is_grad_enabled(), o.chunk_bytes)
            how = f": {p.logit_rows}-token logits chunks, {p.grad_rows}-token gradient groups"
        mem = loss_memory_bytes(n, h, v, hidden.dtype, device_type=hidden.device.type, impl=o.impl,
                                chunk_bytes=o.chunk_bytes, training=torch.is_grad_enabled())
        log.info("loss (%s): %s path%s, about %.2f GiB beyond its inputs at %d tokens",
                 "training" if torch.is_grad_enabled() else "evaluation", backend, how, mem / 2**30, n)

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """[N, H] final hidden states of a packed row; documents never attend to each other.

        What keeps them apart (cu_seqlens for flash-attn, a BlockMask for FlexAttention, length
        buckets for packed_sdpa, the per-document position_ids for SDPA/eager) is built here once
        and used by every layer.
        """
        attention = packed_attention_inputs(self.lm.config._attn_implementation, batch, self.sliding_window,
                                            self.attn_width)
        out = self.lm.get_decoder()(
            input_ids=batch.input_ids[None],
            position_ids=batch.position_ids[None],
            use_cache=False,  # a cache would make HF ignore the document boundaries in position_ids
            **attention,
        )
        return out.last_hidden_state[0]
