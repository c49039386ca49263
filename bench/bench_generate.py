"""Generated tokens/s of exact-match evaluation (msft_fast/training/generation.py), side by side in one run.

Three ways to generate the same greedy answers from the same weights, interleaved, repeated:
- `plain`: HF `generate` on an unwrapped copy of the model (the peer: no FSDP at all);
- `once`: the trainer's default, every parameter all-gathered once per evaluation into a plain copy
  (the gather counts in its time);
- `per_forward`: through the FSDP2-wrapped model, whose blocks all-gather their weights in every
  forward (every generated token), ranks in lockstep.
On 2 ranks (`--nproc 2`, gloo on CPU) each rank generates half the batches, as the trainer does,
and the all-gathers are real collectives. Every mode must produce the same tokens (checked).

    python bench/bench_generate.py                       # 1 and 2 ranks, the default model and batches
    python bench/bench_generate.py --quick               # tiny shapes, a few seconds: checks that it runs

Writes bench/results/generate_<device>.json and .md (rows from every rank count).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_msft import REPO, machine_info, source_note, write_outputs  # noqa: E402


def build_model(layers: int, hidden: int, vocab: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def prompts_for(rows: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 64))] for _ in range(rows)]


def worker(a) -> dict:
    """One rank: the three modes on the same batches, interleaved; returns this rank's timings."""
    import torch

    from msft_fast.runtime.distributed import init_distributed, parallelize, shutdown_distributed
    from msft_fast.training.generation import ShardedGenerator, greedy_generate
    from msft_fast.model import CausalLMWithTaskLoss, decoder_blocks

    torch.set_num_threads(a.threads)
    ctx = init_distributed()
    try:
        plain = build_model(a.layers, a.hidden, a.vocab, seed=0)
        lm = build_model(a.layers, a.hidden, a.vocab, seed=0)
        wrapper = CausalLMWithTaskLoss(lm, 1)
        parallelize(wrapper, decoder_blocks(lm), torch.float32, ctx.device)
        params = sum(p.numel() for p in plain.parameters())
        everything = prompts_for(a.rows, a.vocab, seed=1)
        size = a.batch_rows[0]
        batches = [everything[i:i + size] for i in range(0, len(everything), size)]
        mine = batches[ctx.rank::ctx.world_size]  # the same share for every mode
        stops, pad = [2], 0
        gens = {}
        for mode in ("once", "per_forward"):
            gens[mode] = ShardedGenerator(wrapper, torch.float32, ctx.device, ctx.world_size)
            gens[mode].choose(mode, size * (64 + a.new_tokens), 0, 1)

        def run(mode):
            t0 = time.perf_counter()
            if mode == "plain":
                out = [greedy_generate(plain, b, a.new_tokens, stops, pad, ctx.device) for b in mine]
            else:
                calls = len(batches[0::ctx.world_size])  # rank 0 has the most batches: lockstep pads to it
                with gens[mode].session() as generate:
                    out = [generate(mine[i] if i < len(mine) else mine[-1], a.new_tokens, stops, pad)
                           for i in range(calls if gens[mode].lockstep else len(mine))][:len(mine)]
            return time.perf_counter() - t0, out

        times = {m: [] for m in ("plain", "once", "per_forward")}
        reference = None
        run("once")  # warm-up (allocator, first-call costs) of every path
        run("plain")
        run("per_forward")
        for _ in range(a.repeats):
            for mode in times:
                seconds, out = run(mode)
                times[mode].append(seconds)
                reference = reference or out
                assert out == reference, f"{mode} generated other tokens than the first mode"
        tokens = sum(len(row) for batch in reference for row in batch)
        gather = []
        for _ in range(3):
            t0 = time.perf_counter()
            gens["once"]._copy.fill()
            gens["once"]._copy.empty()
            gather.append(time.perf_counter() - t0)
        return {"rank": ctx.rank, "world_size": ctx.world_size, "params": params, "rows": sum(map(len, mine)),
                "tokens": tokens, "seconds": times, "gather_seconds": statistics.median(gather)}
    finally:
        shutdown_distributed()


def summarise(ranks: list[dict]) -> dict:
    """All ranks together: tokens/s = all ranks' generated tokens over the slowest rank's time."""
    tokens = sum(r["tokens"] for r in ranks)
    out = {"world_size": ranks[0]["world_size"], "params": ranks[0]["params"], "rows": sum(r["rows"] for r in ranks),
           "generated_tokens": tokens, "gather_seconds": max(r["gather_seconds"] for r in ranks), "modes": {}}
    for mode in ranks[0]["seconds"]:
        per_repeat = [max(r["seconds"][mode][i] for r in ranks) for i in range(len(ranks[0]["seconds"][mode]))]
        # The fastest repeat: on a shared machine the others are slowed by other processes, not by us.
        s = min(per_repeat)
        out["modes"][mode] = {"seconds": per_repeat, "min_seconds": s, "median_seconds": statistics.median(per_repeat),
                              "tokens_per_s": tokens / s, "median_tokens_per_s": tokens / statistics.median(per_repeat)}
    base = out["modes"]["plain"]["tokens_per_s"]
    for m in out["modes"].values():
        m["vs_plain"] = m["tokens_per_s"] / base
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rows", type=int, default=64, help="validation rows (prompts of 16-64 random tokens)")
    p.add_argument("--batch-rows", type=int, nargs="+", default=[8, 32], help="rows per generation batch")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="ranks (2: torchrun, gloo)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one rank, results to this file
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.hidden, a.vocab, a.rows, a.batch_rows, a.new_tokens, a.repeats = 2, 64, 512, 8, [4], 4, 1
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if a.worker:
        result = worker(a)
        with open(f"{a.worker}.{result['rank']}", "w") as f:
            json.dump(result, f)
        return result
    runs = []
    for nproc in a.nproc:
        for rows in a.batch_rows:
            with tempfile.TemporaryDirectory() as tmp:
                args = [f"--layers={a.layers}", f"--hidden={a.hidden}", f"--vocab={a.vocab}", f"--rows={a.rows}",
                        f"--batch-rows={rows}", f"--new-tokens={a.new_tokens}", f"--repeats={a.repeats}",
                        f"--threads={a.threads}", f"--worker={tmp}/rank"]
                launcher = [sys.executable] if nproc == 1 else \
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                env = {**os.environ, "TMPDIR": tmp, "OMP_NUM_THREADS": str(a.threads)}
                subprocess.run(launcher + [os.path.abspath(__file__), *args], check=True, env=env, cwd=REPO)
                ranks = [json.load(open(f"{tmp}/rank.{r}")) for r in range(nproc)]
            runs.append({"batch_rows": rows, **summarise(ranks)})
            r = runs[-1]
            print(f"ranks {nproc}, {rows} rows/batch: " + ", ".join(
                f"{m} {v['tokens_per_s']:.0f} tokens/s" for m, v in r["modes"].items()), flush=True)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"what": "generated tokens/s of greedy batched generation: plain HF vs weights gathered once per "
                      "evaluation vs gathered by every forward (FSDP2), same tokens",
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {**machine_info(), "torch_threads": a.threads},
              "setup": {"layers": a.layers, "hidden": a.hidden, "vocab": a.vocab, "rows": a.rows,
                        "new_tokens": a.new_tokens, "repeats": a.repeats, "quick": a.quick},
              "runs": runs}
    write_outputs(a.out, f"generate_{device}" + ("_quick" if a.quick else ""), report, markdown(report))
    return report


def markdown(r: dict) -> list[str]:
    m, s = r["machine"], r["setup"]
    lines = [f"# Exact-match generation: generated tokens/s ({m['device']})", "",
             f"{r['date']}, {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s) per rank, torch "
             f"{m['torch']}, transformers {m['transformers']}, {source_note(m)}; random-init Llama "
             f"{s['layers']} x {s['hidden']}, vocab {s['vocab']} ({r['runs'][0]['params'] / 1e6:.1f}M parameters), "
             f"fp32; {s['rows']} prompts of 16-64 tokens, up to {s['new_tokens']} new tokens each (greedy, KV cache, "
             f"left padding); the fastest of {s['repeats']} interleaved repeats (medians in the JSON: the machine is "
             "shared, and slower repeats measure the other processes); tokens/s counts every rank's generated "
             "tokens over the slowest rank's time. Measured, not modelled.", "",
             "| ranks | rows per batch | plain HF tokens/s | once tokens/s (x plain) | per_forward tokens/s (x plain) "
             "| once: gather s per evaluation |",
             "|---|---|---|---|---|---|"]
    for run in r["runs"]:
        md = run["modes"]
        lines.append(f"| {run['world_size']} | {run['batch_rows']} | {md['plain']['tokens_per_s']:.0f} | "
                     f"{md['once']['tokens_per_s']:.0f} ({md['once']['vs_plain']:.2f}) | "
                     f"{md['per_forward']['tokens_per_s']:.0f} ({md['per_forward']['vs_plain']:.2f}) | "
                     f"{run['gather_seconds']:.3f} |")
    lines += ["", "`once` includes its gather; `plain` is the same model unwrapped on each rank (no gather at all). "
              "`per_forward` all-gathers each block in every forward, one per generated token."]
    return lines


if __name__ == "__main__":
    main()
