"""Memory preflight: estimate what one rank needs before any weight is loaded, and refuse a run that
cannot fit with one ConfigError naming the setting to change.

Per rank, for P parameters, W ranks (FSDP2 shards), N = data.tokens_per_batch tokens per micro-batch
and c bytes per compute-dtype value (2 for bf16, 4 for fp32):

    weights, gradients     4P/W + 4P/W   fp32 masters and their gradients, sharded; with gradient
                                         accumulation (train.grad_accum > 1) and train.grad_sync=step,
                                         gradients 4P: each rank accumulates the unsharded fp32
                                         gradients of the whole model until the step's last
                                         micro-batch reduce-scatters them
    optimizer              8P/W          AdamW exp_avg and exp_avg_sq, fp32, sharded
    gathered               c(P_root + 2 P_block) + (c+4) P_block
                                         all-gathered compute copies of the root (embeddings, head,
                                         final norm) and of two blocks (current + prefetched), and
                                         one block's unsharded gradient with its fp32 reduce copy
    activations            N L [2(4+c)H + c(4H + 4I + 2 D_kv) + 4 heads] + N [(4+c)H + 2c d_head + 32]
                                         what autograd saves for backward in an HF Llama-style block
                                         (two RMSNorms keep an fp32 copy, attention keeps q, k, v and
                                         its output, the SwiGLU MLP keeps 4 tensors of width I);
                                         with SDPA (not flash-attn varlen), HF isolates the packed
                                         documents with an [N, N] mask that each layer keeps, and
                                         repeats k, v to all heads: + N L [cN + 2c(D_q - D_kv) + 8].
                                         Measured with saved-tensor hooks on CPU
                                         (tests/test_preflight.py); eager attention is not modelled
    loss                   msft_fast.kernels.loss_memory_bytes for the path the run takes: on CUDA
                                         the chunked path's buffers (model.loss_chunk_mib, 1 GiB by
                                         default) + 4VH fp32 dW + c(VH + 3NH); on CPU the reference
    workspace              one more layer of activations: backward's transient gradients

It is an estimate, not a bound: allocator fragmentation and library workspaces come on top, so the
check keeps a reserve (CUDA_RESERVE_BYTES and FRAGMENTATION) before it compares with free memory.
On a CPU run only host memory is checked, and only for the weights, gradients and optimizer state.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from msft_fast.attention import run_static_tokens
from msft_fast.errors import ConfigError
from msft_fast.kernels import loss_memory_bytes

GIB = 2**30
CUDA_RESERVE_BYTES = 1 * GIB  # CUDA/NCCL buffers and cuBLAS workspaces that the estimate leaves out
FRAGMENTATION = 1.10  # the caching allocator rarely packs tensors tighter than this


# Backends that keep no [N, N] mask and handle GQA themselves (flash varlen, our packed FlexAttention
# with its block mask, our SDPA over length buckets: its q, k, v copies are padded to their bucket's
# length, a few percent for documents of hundreds of tokens, which the estimate leaves out).
NO_MASK_ATTENTION = ("flash_attention_2", "flash_attention_3", "packed_flex_attention", "flex_attention",
                     "packed_sdpa")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that its memory depends on."""

    hidden: int  # H
    intermediate: int  # I, width of the MLP
    layers: int  # L
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # V
    tied: bool  # LM head shares the embedding matrix
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From an HF config (LlamaConfig and the many configs that share its key names)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        hidden = config.hidden_size
        return cls(
            hidden=hidden,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def block_params(self) -> int:
        H, I, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_dim
        attn = H * q + 2 * H * kv + q * H + (q + 2 * kv + H if self.attention_bias else 0)
        mlp = 3 * H * I + (2 * I + H if self.mlp_bias else 0)
        return attn + mlp + 2 * H  # two RMSNorm weights

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks: embeddings, LM head (unless tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def num_params(self) -> int:
        return self.layers * self.block_params + self.root_params

    def activation_bytes_per_token_per_layer(self, c: int, attention: str = "flash_attention_2",
                                             tokens: int = 0) -> int:
        """Saved for backward by one block, per token of a packed micro-batch of `tokens` tokens."""
        H = self.hidden
        saved = 2 * (4 + c) * H + c * (4 * H + 4 * self.intermediate + 2 * self.kv_dim) + 4 * self.heads
        if attention not in NO_MASK_ATTENTION:
            # SDPA over packed documents: HF passes an [N, N] mask, which rules out SDPA's own GQA,
            # so k and v are repeated to all heads first.
            saved += c * tokens + 2 * c * (self.heads * self.head_dim - self.kv_dim) + 8
        return saved

    def activation_bytes_per_token_outside_layers(self, c: int) -> int:
        # final norm, rotary cos/sin, and the int64 ids, positions, labels and task ids of the batch
        return (4 + c) * self.hidden + 2 * c * self.head_dim + 32


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs: on its GPU (`total`) and in host memory (`host`)."""

    shape: ModelShape
    world_size: int
    tokens_per_batch: int
    compute_dtype: torch.dtype
    attention: str
    activation_checkpointing: bool
    device_type: str
    num_params: int
    grad_accum: int
    grad_sync: str
    loss_impl: str
    loss_chunk_bytes: Optional[int]
    weights: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    loss: int
    workspace: int
    host: int  # host memory of this rank: the fp32 copy it loads before sharding (plus, on CPU, the rest)

    @property
    def compute_bytes(self) -> int:
        return torch.finfo(self.compute_dtype).bits // 8

    def again(self, tokens_per_batch: int, world_size: int) -> "MemoryEstimate":
        """The same run with another micro-batch size or world size."""
        return self.changed(tokens_per_batch=tokens_per_batch, world_size=world_size)

    def changed(self, **settings) -> "MemoryEstimate":
        """The same run with some of estimate_memory's settings changed (e.g. grad_sync="micro_batch")."""
        args = dict(tokens_per_batch=self.tokens_per_batch, world_size=self.world_size,
                    compute_dtype=self.compute_dtype, attention=self.attention,
                    activation_checkpointing=self.activation_checkpointing,
                    num_params=self.num_params if self.num_params != self.shape.num_params else None,
                    device_type=self.device_type, grad_accum=self.grad_accum, grad_sync=self.grad_sync,
                    loss_impl=self.loss_impl, loss_chunk_bytes=self.loss_chunk_bytes)
        args.update(settings)
        return estimate_memory(self.shape, **args)

    @property
    def model_state(self) -> int:
        """Weights, gradients and optimizer state of this rank (the part more ranks shrink)."""
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_state + self.gathered + self.activations + self.loss + self.workspace

    def summary(self) -> str:
        parts = [("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("gathered", self.gathered), ("activations", self.activations), ("loss", self.loss),
                 ("workspace", self.workspace)]
        return ", ".join(f"{name} {_gib(v)}" for name, v in parts)


def estimate_memory(model_config: Any, tokens_per_batch: int, world_size: int,
                    compute_dtype: torch.dtype = torch.bfloat16, *, attention: str = "sdpa",
                    activation_checkpointing: bool = False, num_params: Optional[int] = None,
                    device_type: str = "cuda", grad_accum: int = 1, grad_sync: str = "step",
                    loss_impl: str = "auto", loss_chunk_bytes: Optional[int] = None) -> MemoryEstimate:
    """Estimate one rank's memory for a training step (see the module docstring for the formulas).

    model_config: an HF config (or a ModelShape); attention: the attn_implementation the model
    runs with ("flash_attention_2" keeps no mask; anything else is costed as SDPA with a packed
    mask); num_params: the exact count when the model is at hand (else counted from the config);
    device_type: "cuda" or "cpu" (a CPU run keeps everything in host memory);
    grad_accum, grad_sync: train.grad_accum and train.grad_sync (accumulating micro-batches without
    a reduction in between keeps the whole model's gradients unsharded); loss_impl and
    loss_chunk_bytes: the fused loss's path and chunk budget (model.loss_impl, model.loss_chunk_mib).
    """
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    P = num_params if num_params is not None else shape.num_params
    W, N = world_size, tokens_per_batch
    c = torch.finfo(compute_dtype).bits // 8
    H, V, L = shape.hidden, shape.vocab, shape.layers

    weights = grads = math.ceil(4 * P / W)
    if grad_accum > 1 and grad_sync == "step":
        grads = 4 * P  # the unsharded fp32 accumulation; the sharded gradients come from it block by block
    optimizer = 2 * weights
    gathered = c * (shape.root_params + 2 * shape.block_params) + (c + 4) * shape.block_params

    per_layer = shape.activation_bytes_per_token_per_layer(c, attention, N)
    outside = shape.activation_bytes_per_token_outside_layers(c)
    if activation_checkpointing:  # each block keeps its input; one block's activations exist at a time
        act_per_token = L * c * H + per_layer + outside
    else:
        act_per_token = L * per_layer + outside
    loss = loss_memory_bytes(N, H, V, compute_dtype, device_type=device_type, impl=loss_impl,
                             chunk_bytes=loss_chunk_bytes)
    workspace_per_token = per_layer

    host = 4 * P  # every rank loads the whole model in fp32 on its CPU before sharding it
    if device_type == "cpu":
        host += grads + optimizer
    return MemoryEstimate(
        shape=shape, world_size=W, tokens_per_batch=N, compute_dtype=compute_dtype, attention=attention,
        activation_checkpointing=activation_checkpointing, device_type=device_type, num_params=P,
        grad_accum=grad_accum, grad_sync=grad_sync, loss_impl=loss_impl, loss_chunk_bytes=loss_chunk_bytes,
        weights=weights, grads=grads, optimizer=optimizer, gathered=gathered,
        activations=N * act_per_token, loss=loss,
        workspace=N * workspace_per_token,
        host=host,
    )


def free_memory(device: torch.device) -> int:
    """Free bytes on `device`: the GPU's free memory, or the host's available memory for a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_memory()


HOST_MEMORY_ENV = "MSFT_FAST_HOST_MEMORY_GIB"


def host_available_memory() -> int:
    """Host memory available to this run, in bytes: $MSFT_FAST_HOST_MEMORY_GIB when set (a virtual
    machine whose memory grows as it is used reports far less than it can give), else MemAvailable."""
    override = os.environ.get(HOST_MEMORY_ENV)
    if override is not None:
        try:
            gib = float(override)
        except ValueError:
            gib = float("nan")
        if not gib > 0 or gib == float("inf"):
            raise ConfigError(f"environment variable {HOST_MEMORY_ENV} must be a positive number of GiB, got {override!r}")
        return int(gib * GIB)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(estimate: MemoryEstimate, device: torch.device, *, free_bytes: Optional[int] = None,
                 host_free_bytes: Optional[int] = None, ranks_on_host: int = 1, min_tokens_per_batch: int = 1) -> None:
    """Raise a ConfigError naming the setting to change when `estimate` does not fit.

    On CUDA: the GPU's free memory (`free_bytes`, else torch.cuda.mem_get_info) must hold the
    estimate times FRAGMENTATION plus CUDA_RESERVE_BYTES, and the host (`host_free_bytes`, else
    MemAvailable) the fp32 copies that `ranks_on_host` ranks load. On a CPU only the host is checked.
    min_tokens_per_batch: the smallest data.tokens_per_batch the config allows (data.max_seq_len).
    """
    host_need = ranks_on_host * estimate.host
    host_free = host_available_memory() if host_free_bytes is None else host_free_bytes
    if device.type != "cuda":
        if host_need > host_free:
            raise ConfigError(
                f"the run needs about {_gib(host_need)} of host memory for the weights, gradients and optimizer "
                f"state ({estimate.num_params / 1e6:.1f}M parameters, {ranks_on_host} rank(s) on this host) but "
                f"{_gib(host_free)} is available: use a smaller model (model.path) or a machine with more memory")
        return
    free = free_memory(device) if free_bytes is None else free_bytes
    budget = (free - CUDA_RESERVE_BYTES) / FRAGMENTATION  # what the estimate itself may use
    if estimate.total > budget:
        need = estimate.total * FRAGMENTATION + CUDA_RESERVE_BYTES
        raise ConfigError(f"the run needs about {_gib(need)} per GPU but {device} has {_gib(free)} free "
                          f"({estimate.summary()}): {_advice(estimate, budget, min_tokens_per_batch)}")
    if host_need > host_free:
        raise ConfigError(
            f"loading the model takes about {_gib(host_need)} of host memory ({ranks_on_host} rank(s) on this host "
            f"each load the {estimate.num_params / 1e6:.0f}M parameters in fp32 before sharding them) but "
            f"{_gib(host_free)} is available: run fewer ranks per node or use a machine with more memory")


def _advice(est: MemoryEstimate, budget: float, min_tokens: int) -> str:
    """The cheapest change that fits: reducing gradients every micro-batch, fewer tokens per
    micro-batch, else more GPUs."""
    fits = lambda e: e.total <= budget  # noqa: E731
    if est.grads > est.weights and fits(est.changed(grad_sync="micro_batch")):
        return (f"set train.grad_sync=micro_batch (gradients then stay sharded instead of accumulating "
                f"{_gib(est.grads)} unsharded over train.grad_accum={est.grad_accum} micro-batches), or train on "
                "more GPUs")
    if min_tokens < est.tokens_per_batch and fits(est.again(min_tokens, est.world_size)):
        tokens = _largest(lambda n: fits(est.again(n, est.world_size)), min_tokens, est.tokens_per_batch)
        if tokens >= 1024:
            tokens = max(min_tokens, tokens // 256 * 256)
        return (f"set data.tokens_per_batch to {tokens} or less (now {est.tokens_per_batch}; raise "
                "train.grad_accum to keep the tokens per optimizer step), or train on more GPUs")
    # Even the smallest micro-batch does not fit: only sharding the model state over more ranks helps.
    tokens = min(min_tokens, est.tokens_per_batch)
    most = 1 << 20
    if fits(est.again(tokens, most)):
        ranks = _largest(lambda w: not fits(est.again(tokens, w)), est.world_size, most) + 1
        return (f"train on at least {ranks} GPUs (FSDP shards the {_gib(est.model_state * est.world_size)} of "
                f"weights, gradients and optimizer state over them), with data.tokens_per_batch={tokens}")
    return (f"even one micro-batch of data.max_seq_len ({tokens}) tokens does not fit: lower data.max_seq_len "
            "and data.tokens_per_batch, or use GPUs with more memory")


def _largest(ok, lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with ok(n), given ok(lo) and ok monotone (true, then false)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def preflight_memory(cfg: Any, model_config: Any, world_size: int, device: torch.device,
                     compute_dtype: torch.dtype, *, attention: str = "sdpa", num_params: Optional[int] = None,
                     free_bytes: Optional[int] = None, host_free_bytes: Optional[int] = None,
                     activation_checkpointing: Optional[bool] = None) -> MemoryEstimate:
    """Estimate the run `cfg` (a Config, see estimate_run) and raise a ConfigError when it cannot fit;
    return the estimate.

    Call it after the config and data are validated and before the weights are loaded or moved to
    the device, on every rank (each checks its own GPU). Ranks on this host: $LOCAL_WORLD_SIZE.
    """
    estimate = estimate_run(cfg, model_config, world_size, compute_dtype, device.type, attention=attention,
                            num_params=num_params, activation_checkpointing=activation_checkpointing)
    check_memory(estimate, device, free_bytes=free_bytes, host_free_bytes=host_free_bytes,
                 ranks_on_host=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                 min_tokens_per_batch=cfg.data.max_seq_len)
    return estimate


def estimate_run(cfg: Any, model_config: Any, world_size: int, compute_dtype: torch.dtype, device_type: str = "cuda",
                 *, attention: str = "sdpa", num_params: Optional[int] = None,
                 activation_checkpointing: Optional[bool] = None) -> MemoryEstimate:
    """estimate_memory for the run `cfg` (a Config): its micro-batch, gradient accumulation and
    activation checkpointing. The GPU checks compare this with the memory a run took.

    activation_checkpointing: None reads train.activation_checkpointing, where "selective" is
    costed as no checkpointing (the estimate errs on the safe side).
    """
    t = cfg.train
    if activation_checkpointing is None:
        activation_checkpointing = t.activation_checkpointing == "full"
    # Static shapes pad every micro-batch up to a multiple of 128 tokens: budget for the padded row.
    tokens = run_static_tokens(cfg.data.static_shapes, cfg.data.tokens_per_batch, attention, t.compile)
    return estimate_memory(model_config, tokens or cfg.data.tokens_per_batch, world_size, compute_dtype,
                           attention=attention, num_params=num_params, device_type=device_type,
                           activation_checkpointing=activation_checkpointing, grad_accum=t.grad_accum,
                           grad_sync=t.grad_sync, loss_impl=cfg.model.loss_impl,
                           loss_chunk_bytes=cfg.model.loss_chunk_mib * 2**20)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
