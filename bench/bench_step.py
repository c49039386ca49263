"""Training-step throughput on this machine: msft-fast (packed rows, per-document attention,
chunked loss from hidden states, FSDP2 at one rank) against the plain HF recipe (padded batches
with an attention mask, `model(..., labels=...).loss`), on the same documents, side by side.

Counts useful tokens (no padding) per second over one pass of the documents, forward + backward +
AdamW step. Writes bench/results/step_cpu.json and .md.

    python bench/bench_step.py [--docs 96 --min-len 32 --max-len 512 --hidden 256 --layers 4 --vocab 32000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


def make_docs(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    """Document lengths drawn log-uniformly (SFT sets mix short and long rows); 60% of each trained."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int)
    docs = []
    for length in lengths:
        ids = rng.integers(8, vocab, length)
        labels = np.roll(ids, -1)
        labels[: int(length * 0.4)] = -100
        labels[-1] = -100
        docs.append((ids, labels))
    return docs


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=4096)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def run_ours(docs, args) -> float:
    from msft_fast.data.packing import best_fit_pack, collate, MicroBatchPlan
    from msft_fast.data.tasks import DocSet
    from msft_fast.runtime.distributed import init_distributed, parallelize, shutdown_distributed
    from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks

    lengths = np.array([len(d[0]) for d in docs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ids = np.concatenate([d[0] for d in docs]).astype(np.int32)
    labels = np.concatenate([d[1] for d in docs]).astype(np.int32)
    docset = DocSet(ids, labels, starts, lengths, np.array([(d[1] != -100).sum() for d in docs]))
    plans = [MicroBatchPlan(np.zeros(len(b), np.int64), np.array(b), int(lengths[b].sum()))
             for b in best_fit_pack(lengths, args.tokens_per_batch)]
    batches = [collate(p, [docset], [0]) for p in plans]
    ctx = init_distributed()
    try:
        lm = build_model(args)
        model = CausalLMWithTaskLoss(lm, num_tasks=1)
        parallelize(model, decoder_blocks(lm), torch.float32, ctx.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        n_loss = sum(b.num_loss_tokens for b in batches)

        def epoch():
            for b in batches:
                loss, _ = model(b)
                (loss / n_loss).backward()
            opt.step()
            opt.zero_grad()

        epoch()  # warm-up
        t0 = time.perf_counter()
        epoch()
        return time.perf_counter() - t0
    finally:
        shutdown_distributed()


def run_hf_padded(docs, args) -> float:
    """The common recipe: sort-free batches of `rows` documents padded to the longest, masked."""
    lm = build_model(args)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, foreach=True)
    rows = max(1, args.tokens_per_batch // args.max_len)
    batches = []
    for i in range(0, len(docs), rows):
        group = docs[i : i + rows]
        width = max(len(d[0]) for d in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        for r, (d_ids, d_labels) in enumerate(group):
            ids[r, : len(d_ids)] = torch.from_numpy(d_ids)
            mask[r, : len(d_ids)] = 1
            # HF shifts labels itself: give it unshifted targets (label at i is the token at i).
            unshifted = np.concatenate([[-100], d_labels[:-1]])
            labels[r, : len(d_ids)] = torch.from_numpy(unshifted)
        batches.append((ids, mask, labels))

    def epoch():
        for ids, mask, labels in batches:
            lm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()

    epoch()
    t0 = time.perf_counter()
    epoch()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--tokens-per-batch", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args()
    docs = make_docs(a.docs, a.min_len, a.max_len, a.vocab)
    useful = sum(len(d[0]) for d in docs)
    ours = run_ours(docs, a)
    peer = run_hf_padded(docs, a)
    report = {
        "what": "one pass over the documents: forward + backward + AdamW step; useful (unpadded) tokens/s",
        "setup": vars(a) | {"useful_tokens": useful},
        "machine": {"device": "cpu", "cores": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"),
        "results": {"msft_fast_packed": {"seconds": ours, "tokens_per_s": useful / ours},
                    "hf_padded": {"seconds": peer, "tokens_per_s": useful / peer}},
        "speedup_msft_fast_over_hf_padded": peer / ours,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "step_cpu.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# Training step on CPU: {a.docs} documents of {a.min_len}-{a.max_len} tokens ({useful} tokens), "
             f"Llama {a.layers}x{a.hidden}, vocab {a.vocab}", "",
             f"{report['date']}, {os.cpu_count()} cores, torch {torch.__version__}", "",
             "| recipe | seconds | useful tokens/s |", "|---|---|---|"]
    for k, r in report["results"].items():
        lines.append(f"| {k} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} |")
    lines += ["", f"speed-up of msft-fast over the padded HF recipe: {report['speedup_msft_fast_over_hf_padded']:.2f}x"]
    with open(os.path.join(a.out, "step_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
