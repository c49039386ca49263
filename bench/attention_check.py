"""Packed attention backends against the per-document reference, on the device at hand: rows of documents
of awkward lengths through each backend (flash-attn varlen, FlexAttention plain and with compiled decoder
blocks, packed SDPA, SDPA, eager), Llama and a sliding-window Mistral; logits and the gradients of a summed
loss against each document alone in fp32 eager. A backend passes within a few times the rounding error of
eager in its dtype document by document; the leak control (documents seeing each other) must fail that bound.
CUDA: bf16, forward and backward; CPU: fp32, FlexAttention forward only (no backward there). Exit 1 on a failure.

    python bench/attention_check.py [--out DIR]      # JSON to DIR/attention_check.json (default $OUT)
    python bench/attention_check.py --cpu            # the CPU even with a GPU present
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msft_fast.attention import FLEX_ATTENTION, PACKED_SDPA  # noqa: E402  (registers the backends with HF)
from msft_fast.data.formats import IGNORE_INDEX  # noqa: E402
from msft_fast.data.packing import _to_batch  # noqa: E402
from msft_fast.model import CausalLMWithTaskLoss  # noqa: E402

# Rows of documents: one-token documents, lengths off FlexAttention's 128-token blocks, one long.
GPU_ROWS = [[1, 7, 130, 2, 1, 1000, 513, 1, 1200, 77, 255], [3000, 64, 1, 129]]
CPU_ROWS = [[1, 7, 130, 2, 1, 33, 19], [50, 1, 129]]
SLIDING_WINDOW = 96
TOLERANCE_FACTOR = 4.0  # a backend may be this many times the rounding error of per-document eager
ABS_FLOOR = 1e-5  # fp32 eager against itself is exact: allow fp32 summation-order noise on top


def model_config(kind: str, cuda: bool, vocab: int):
    from transformers import LlamaConfig, MistralConfig

    shape = dict(vocab_size=vocab, hidden_size=512 if cuda else 64, intermediate_size=1024 if cuda else 128,
                 num_hidden_layers=4 if cuda else 2, num_attention_heads=8 if cuda else 4, num_key_value_heads=2,
                 max_position_embeddings=4096, initializer_range=0.08)  # large weights: a leak shows plainly
    return MistralConfig(sliding_window=SLIDING_WINDOW if cuda else 9, **shape) if kind == "mistral" else \
        LlamaConfig(**shape)


def make_row(lengths: list[int], vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]
    labels = [np.append(x[1:], IGNORE_INDEX).astype(np.int32) for x in ids]  # next token, none across documents
    return _to_batch(ids, labels, [np.arange(n, dtype=np.int64) for n in lengths],
                     [np.zeros(n, np.int64) for n in lengths], list(lengths))


def build(config, state: dict, attn: str, device, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).train()  # no dropout in these configs; train for autograd
    # Switch after moving: HF checks flash-attn against the device and dtype the model has.
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn, (attn, model.config._attn_implementation)
    return model


def logits_and_grads(model, batch, backward: bool, packed: bool = True):
    """Packed: logits[N, V] of the row through CausalLMWithTaskLoss.hidden_states (what training
    runs). Not packed: each document alone. Plus the gradients of the summed loss over the row."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        if packed:
            logits = model.lm_head(CausalLMWithTaskLoss(model, num_tasks=1).hidden_states(batch)).float()
        else:
            cu = batch.cu_seqlens.tolist()
            logits = torch.cat([model(input_ids=batch.input_ids[None, a:b], use_cache=False).logits[0].float()
                                for a, b in zip(cu, cu[1:])])
        if backward:
            F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX, reduction="sum").backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None} if backward else {}
    return logits.detach(), grads


def leaky_logits(model, batch):
    """The row with documents seeing each other (position ids still per document): the leak control."""
    n = batch.num_tokens
    with torch.no_grad():
        return model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                     attention_mask=torch.ones(1, n, dtype=torch.long, device=batch.input_ids.device),
                     use_cache=False).logits[0].float()


def rel_err(x, ref) -> float:
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def grad_rel_err(grads, ref) -> float:
    num = sum(float((grads[k] - ref[k]).norm() ** 2) for k in ref)
    den = sum(float(ref[k].norm() ** 2) for k in ref)
    return (num / max(den, 1e-30)) ** 0.5


def backends(cuda: bool) -> list[tuple[str, str, bool, str | None]]:
    """(label, attn_implementation, compile the decoder blocks, why it cannot run or None)."""
    no_flash = "flash-attn needs CUDA" if not cuda else None if importlib.util.find_spec("flash_attn") else \
        "flash-attn is not installed"
    no_triton = None if (not cuda or importlib.util.find_spec("triton")) else "Triton is not installed"
    return [("flash_attention_2", "flash_attention_2", False, no_flash), ("flex", FLEX_ATTENTION, False, no_triton),
            ("flex_compiled_blocks", FLEX_ATTENTION, True, no_triton if cuda else "compiled blocks: GPU only"),
            ("packed_sdpa", PACKED_SDPA, False, None), ("sdpa", "sdpa", False, None), ("eager", "eager", False, None)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for attention_check.json (default $OUT)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    a = p.parse_args()

    cuda = torch.cuda.is_available() and not a.cpu
    device, dtype, vocab, rows = (torch.device("cuda"), torch.bfloat16, 1024, GPU_ROWS) if cuda else \
        (torch.device("cpu"), torch.float32, 97, CPU_ROWS)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
              "torch": torch.__version__, "rows": rows, "tolerance_factor": TOLERANCE_FACTOR, "checks": []}

    def record(entry: dict) -> None:
        report["checks"].append(entry)
        figures = " ".join(f"{k} {entry[k]:.2e}" for k in ("logits_err", "grad_err", "bound") if k in entry)
        print(f"{entry['model']:8s} {entry['backend']:22s} {entry['status']:14s} {figures} {entry.get('why', '')}",
              flush=True)

    for kind in ("llama", "mistral"):
        config = model_config(kind, cuda, vocab)
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        state = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).state_dict()
        batches = [make_row(r, vocab, seed=i).to(device) for i, r in enumerate(rows)]
        # The reference: fp32 eager, each document alone. The rounding yardstick: the same in `dtype`.
        ref_model = build(config, state, "eager", device, torch.float32)
        refs = [logits_and_grads(ref_model, b, backward=True, packed=False) for b in batches]
        yard_model = build(config, state, "eager", device, dtype)
        yard = [logits_and_grads(yard_model, b, backward=True, packed=False) for b in batches]
        bound_logits = max(TOLERANCE_FACTOR * rel_err(y[0], r[0]) for y, r in zip(yard, refs)) + ABS_FLOOR
        bound_grads = max(TOLERANCE_FACTOR * grad_rel_err(y[1], r[1]) for y, r in zip(yard, refs)) + ABS_FLOOR
        leak = max(rel_err(leaky_logits(yard_model, b), r[0]) for b, r in zip(batches, refs))
        seen = leak > 10 * bound_logits  # else a leak would not be detected at this bound: the check proves nothing
        record({"model": kind, "backend": "leak_control", "logits_err": leak, "bound": bound_logits,
                "status": "ok" if seen else "failed", "why": "" if seen else "a leak would pass this bound"})
        del ref_model, yard_model

        for label, attn, compile_blocks, why_not in backends(cuda):
            if compile_blocks and kind != "llama" and not why_not:
                why_not = "compiled blocks: checked on llama only (compile time)"
            if why_not:
                record({"model": kind, "backend": label, "status": "not available", "why": why_not})
                continue
            backward = cuda or attn != FLEX_ATTENTION
            t0 = time.perf_counter()
            try:
                model = build(config, state, attn, device, dtype)
                if compile_blocks:
                    for block in model.model.layers:
                        block.compile()
                results = [logits_and_grads(model, b, backward) for b in batches]
            except Exception as e:  # one line per backend; the others still run
                record({"model": kind, "backend": label, "status": "failed",
                        "why": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
                continue
            entry = {"model": kind, "backend": label, "compiled_blocks": compile_blocks, "backward": backward,
                     "seconds": round(time.perf_counter() - t0, 1), "bound": bound_logits,
                     "logits_err": max(rel_err(x[0], r[0]) for x, r in zip(results, refs))}
            if backward:
                entry["grad_err"] = max(grad_rel_err(x[1], r[1]) for x, r in zip(results, refs))
                entry["grad_bound"] = bound_grads
            ok = entry["logits_err"] <= bound_logits and entry.get("grad_err", 0) <= bound_grads
            record(entry | {"status": "ok" if ok else "failed"})
            del model

    failed = sum(c["status"] == "failed" for c in report["checks"])
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "attention_check.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(f"attention_check: {'FAILED ' + str(failed) if failed else 'all passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
