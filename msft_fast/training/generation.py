"""Greedy, batched generation from the trainer's FSDP2-sharded HF model, for evaluations that score
generated answers (`exact_match.py`): left padding, a KV cache, stop tokens, no sampling.

Generation runs one forward per generated token, so how the sharded weights reach each forward
decides its cost (`msft.generation_gather`):

- `once`: every parameter is all-gathered once per evaluation, in the compute dtype, into a plain
  copy of the HF model (no FSDP hooks, no collective while generating, so each rank generates its
  own rows at its own pace); the copy's tensors are freed when the evaluation ends. Extra memory:
  the whole model in the compute dtype on every rank, during evaluations only.
- `per_forward`: generation runs through the FSDP-wrapped model itself, whose blocks all-gather
  their weights for every forward and free them after, as in training: the memory of about one
  block, but one all-gather per block per generated token, and the ranks step together (HF's
  `synced_gpus`: a rank whose rows are done keeps joining the forwards until every rank is done).
- `auto` (default): `once` when the copy plus a generation batch's KV cache and activations fit in
  90% of the memory free at the run's first evaluation (the optimizer state still to come counted
  as taken; host memory on a CPU, split between the host's ranks), else `per_forward`.

Both give the same tokens: the copy holds exactly the values FSDP's mixed-precision all-gather
produces (each shard cast to the compute dtype, then gathered).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from msft_fast.runtime.distributed import all_reduce_sum, reshard_all, unshard

GATHER_MODES = ("once", "per_forward")
# Attention backends that take a padded batch and a KV cache as HF generate passes them; the
# trainer's packed FlexAttention function does not, so generation swaps it for SDPA (or eager).
GENERATION_ATTENTION = ("sdpa", "eager", "flash_attention_2")
MEMORY_HEADROOM = 0.9

# generate(prompts, max_new_tokens, stop_ids, pad_id) -> each row's new tokens
GenerateFn = Callable[[Sequence[Sequence[int]], int, Sequence[int], int], list[list[int]]]


@dataclass(frozen=True)
class GatherChoice:
    mode: str  # once | per_forward
    reason: str  # one sentence, logged and kept in history.json


def generation_attention(lm: nn.Module) -> str:
    """The HF attention backend generation runs with: the model's own when it takes padded batches
    with a cache, else SDPA where the model class supports it, else eager."""
    current = str(lm.config._attn_implementation)
    if current in GENERATION_ATTENTION:
        return current
    return "sdpa" if getattr(type(lm), "_supports_sdpa", False) else "eager"


def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
                    pad_id: int, device: torch.device, synced: bool = False) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (token id lists of any lengths), left-padded into
    one [B, P] batch with its attention mask and decoded with HF `generate` and a KV cache.

    Returns, per row, its new tokens up to and including the first of `stop_ids`, or
    `max_new_tokens` of them when it never stops. synced: keep joining forwards until every rank
    is done (the FSDP-wrapped model all-gathers in every forward: ranks must call it together).
    """
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    # A config of our own: the model's (sampling, temperature, its own stop tokens) must not leak in.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=list(stop_ids), pad_token_id=pad_id, bos_token_id=None)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         synced_gpus=synced)
    new = out[:, width:].tolist()
    stops = set(stop_ids)
    rows = []
    for tokens in new:
        end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        rows.append(tokens[:end])
    return rows


class PlainCopy:
    """An unsharded, hook-free copy of an FSDP2-wrapped HF model. `fill()` all-gathers every
    parameter once, in the compute dtype, into it; `empty()` frees them (back to the meta device),
    so the copy costs memory only while an evaluation generates."""

    def __init__(self, lm: nn.Module, dtype: torch.dtype, attn_implementation: str):
        config = copy.deepcopy(lm.config)
        config._attn_implementation = attn_implementation
        with torch.device("meta"):
            self.model = type(lm)(config)
        self.model.eval().requires_grad_(False)
        self.model.generation_config = copy.deepcopy(lm.generation_config)
        self.source, self.dtype = lm, dtype

    def fill(self) -> nn.Module:
        """Every rank must call this together (one all-gather per parameter, in a fixed order)."""
        from torch.distributed.tensor import DTensor

        gathered: dict[int, nn.Parameter] = {}  # tied parameters are gathered once and stay tied
        with torch.no_grad():
            for name, p in self.source.named_parameters(remove_duplicate=False):
                if id(p) not in gathered:
                    t = p.detach().to(self.dtype)
                    t = t.full_tensor() if isinstance(t, DTensor) else t
                    gathered[id(p)] = nn.Parameter(t, requires_grad=False)
                _set_tensor(self.model, name, gathered[id(p)], parameter=True)
            # Buffers (rotary frequencies, embedding scales) are never sharded: shared as they are.
            for name, b in self.source.named_buffers(remove_duplicate=False):
                _set_tensor(self.model, name, b, parameter=False)
        return self.model

    def empty(self) -> None:
        self.model.to("meta")


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner)
    (module._parameters if parameter else module._buffers)[leaf] = value


class ShardedGenerator:
    """Generation from the trainer's FSDP2 wrapper (`wrapper.lm` is the HF model), with the weights
    gathered once per evaluation or per forward (module docstring)."""

    def __init__(self, wrapper: nn.Module, dtype: torch.dtype, device: torch.device, world_size: int):
        self.wrapper, self.lm = wrapper, wrapper.lm
        self.dtype, self.device, self.world_size = dtype, device, world_size
        self.choice: Optional[GatherChoice] = None
        self._copy: Optional[PlainCopy] = None

    @property
    def lockstep(self) -> bool:
        """Ranks must make the same generate calls in the same order (the weights are gathered in
        every forward)."""
        return self.choice is not None and self.choice.mode == "per_forward" and self.world_size > 1

    def choose(self, requested: str, batch_tokens: int, reserved_bytes: int, ranks_per_host: int) -> GatherChoice:
        """Decide `once` or `per_forward` (see the module docstring). Every rank must call this
        together: when one rank lacks the memory for `once`, all of them gather per forward."""
        if requested != "auto":
            self.choice = GatherChoice(requested, f"msft.generation_gather={requested}")
            return self.choice
        need = self.copy_bytes() + generation_batch_bytes(self.lm, self.dtype, batch_tokens)
        free = free_memory(self.device, ranks_per_host)
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        if free is None:
            self.choice = GatherChoice("once", f"free memory could not be measured; the gathered copy needs {gib(need)}")
        else:
            free -= reserved_bytes
            fits = need <= MEMORY_HEADROOM * free
            self.choice = GatherChoice(
                "once" if fits else "per_forward",
                f"the gathered copy of the weights and a generation batch need {gib(need)}, and "
                f"{MEMORY_HEADROOM:.0%} of the {gib(max(free, 0))} free per rank (optimizer state to come counted) "
                + ("holds them" if fits else "does not: each block is gathered for every forward instead"))
        short = torch.tensor([1.0 if self.choice.mode == "per_forward" else 0.0], device=self.device)
        if all_reduce_sum(short).item() > 0 and self.choice.mode == "once":
            self.choice = GatherChoice("per_forward", "another rank lacks the memory for a gathered copy of the "
                                                      "weights: each block is gathered for every forward")
        return self.choice

    def copy_bytes(self) -> int:
        params = {id(p): p for p in self.lm.parameters()}.values()
        return sum(p.numel() for p in params) * torch.empty((), dtype=self.dtype).element_size()

    @contextlib.contextmanager
    def session(self) -> Iterator[GenerateFn]:
        """A `generate(prompts, max_new_tokens, stop_ids, pad_id)` for one evaluation; every rank
        must enter it together. The weights are gathered on entry (`once`) or by every forward."""
        if self.choice is None:
            raise RuntimeError("choose() the gather mode first")
        if self.choice.mode == "once":
            if self._copy is None:
                self._copy = PlainCopy(self.lm, self.dtype, generation_attention(self.lm))
            model = self._copy.fill()
            try:
                yield lambda prompts, n, stop, pad: greedy_generate(model, prompts, n, stop, pad, self.device)
            finally:
                self._copy.empty()
            return
        # per_forward: the root (embeddings, final norm, head) is gathered here, since generate
        # bypasses the root's forward; each block gathers in its own hooks, for every forward.
        attn, before = generation_attention(self.lm), str(self.lm.config._attn_implementation)
        unshard(self.wrapper)
        if attn != before:
            self.lm.set_attn_implementation(attn)
        try:
            synced = self.world_size > 1
            yield lambda prompts, n, stop, pad: greedy_generate(self.lm, prompts, n, stop, pad, self.device, synced)
        finally:
            if attn != before:
                self.lm.set_attn_implementation(before)
            reshard_all(self.wrapper)


def generation_batch_bytes(lm: nn.Module, dtype: torch.dtype, batch_tokens: int) -> int:
    """About the most one generation batch of `batch_tokens` (rows x (prompt + new tokens)) holds at
    once: its KV cache, and the prefill's activations (hidden states, MLP, logits of the last
    positions), in `dtype`; an estimate for choosing the gather mode, not a bound."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    size = torch.empty((), dtype=dtype).element_size()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = batch_tokens * config.num_hidden_layers * 2 * kv_heads * head_dim * size
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    activations = batch_tokens * (4 * config.hidden_size + 3 * inter) * size
    return kv + activations + batch_tokens * config.vocab_size * 4 // 8  # logits: a few rows' worth


def free_memory(device: torch.device, ranks_per_host: int) -> Optional[int]:
    """Bytes this rank can still allocate: free device memory plus what PyTorch's caching allocator
    holds unused (CUDA), or its share of the host's available memory (CPU); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    from msft_fast.state.snapshot import host_memory_available

    available = host_memory_available()
    return None if available is None else available // max(1, ranks_per_host)
