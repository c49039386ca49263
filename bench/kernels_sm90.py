"""Compile every loss kernel, in every configuration the code can launch, for sm_90a (H100/H200) on a CPU
and report what the compiler made of it: registers, shared memory, spills, wgmma and cp.async, the kind of
every atomic and fence. triton.compile goes to a cubin for GPUTarget("cuda", 90, 32) with the ptxas the
triton wheel ships (`ptxas -v`: registers, spills); its nvdisasm gives the SASS, where acq_rel atomics show
as MEMBAR.*.GPU around ATOMG (a relaxed one is a bare REDG). Pointers and N/V/H get 16-byte divisibility, as
a real launch specialises them. tests/test_loss_triton.py runs it; run it without TRITON_INTERPRET.

    python bench/kernels_sm90.py                        # writes bench/results/kernels_sm90.{md,json}
    python bench/kernels_sm90.py --out /tmp/k.md        # elsewhere
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from msft_fast.kernels import chunked, task_stats
from msft_fast.kernels import triton_flce as tiled

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS, NVDISASM = os.path.join(BIN, "ptxas"), os.path.join(BIN, "nvdisasm")
SHARED_LIMIT = 227 * 1024  # the most shared memory one block may use on H100/H200
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INT_SCALARS = {"N", "V", "H", "S", "ignore_index", "row_start"}
DIVISIBLE = {"N", "V", "H"}  # multiples of 16 in every real model; the compiler specialises on it
# Pointers whose element type is the input dtype; the rest are fp32 unless listed as integers.
INPUT_POINTERS = {"h_ptr", "w_ptr", "b_ptr", "dz_ptr", "dx_ptr"}
I64_POINTERS = {"y_ptr", "tid_ptr"}
I32_POINTERS = {"idx_ptr", "hit_ptr", "tok_part_ptr", "hit_part_ptr"}


@triton.jit
def _ordered_atomic_probe(x_ptr, y_ptr, N):
    """An atomic add with the default (acq_rel) semantics: what the detectors below must flag."""
    offs = tl.program_id(0) * 128 + tl.arange(0, 128)
    tl.atomic_add(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)


def jobs() -> list[dict]:
    """Every (kernel, dtype, constexprs, launch options) a GPU run can compile."""
    out = []

    def add(fn, dtype, consts, num_warps, num_stages=None, label=""):
        opts = dict(num_warps=num_warps) | ({} if num_stages is None else dict(num_stages=num_stages))
        out.append(dict(fn=fn, dtype=dtype, consts=consts, opts=opts, label=label))

    def tiled_consts(c, dtype):
        return dict(BLOCK_M=c["BLOCK_M"], BLOCK_V=c["BLOCK_V"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
                    HAS_BIAS=True, HAS_SOFTCAP=True, UPCAST=False, DOT_PRECISION=tiled.DOT_PRECISION[dtype])

    def label(c):
        return f"{c['BLOCK_M']}x{c['BLOCK_V']}x{c['BLOCK_K']} g{c['GROUP_M']} w{c['num_warps']} s{c['num_stages']}"

    fp32 = tiled.GPU_BLOCKS[torch.float32]
    fp32_config = dict(BLOCK_M=fp32.block_m, BLOCK_V=fp32.block_v, BLOCK_K=fp32.block_k, GROUP_M=fp32.group_m,
                       num_warps=fp32.num_warps, num_stages=fp32.num_stages)
    for name, fn, configs, extra in (
            ("fwd", tiled._fwd_kernel, tiled.FWD_CONFIGS, {}),
            ("bwd", tiled._bwd_kernel, tiled.BWD_CONFIGS,
             dict(HAS_FILTER=True, NEED_DH=True, NEED_DW=True, NEED_DB=True)),
            ("dlogits", tiled._dlogits_kernel, tiled.DLOGITS_CONFIGS, dict(NEED_DB=True))):
        for dtype in (torch.bfloat16, torch.float16):
            for c in configs:
                add(fn, dtype, tiled_consts(c, dtype) | extra, c["num_warps"], c["num_stages"], label(c))
        add(fn, torch.float32, tiled_consts(fp32_config, torch.float32) | extra, fp32.num_warps, fp32.num_stages,
            label(fp32_config))
    add(tiled._combine_kernel, torch.float32, dict(BLOCK_N=128), 4, label="BLOCK_N 128")
    for t_tiles in (1, 1000):
        t_tile, block_n = task_stats.task_tiles(t_tiles)
        add(task_stats._task_sums_kernel, torch.float32, dict(BLOCK_N=block_n, T_TILE=t_tile), 4,
            label=f"T_TILE {t_tile}, BLOCK_N {block_n}")
    modes = {"train": dict(STATS=True, GRAD=True, UPSTREAM=False), "eval": dict(STATS=True, GRAD=False, UPSTREAM=False),
             "bwd-none": dict(STATS=False, GRAD=True, UPSTREAM=True)}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for c in chunked.ROW_CONFIGS:
            for mode, flags in modes.items():
                if mode != "train" and (dtype != torch.bfloat16 or c is not chunked.ROW_CONFIGS[-1]):
                    continue  # the other modes only drop code: one configuration of each suffices
                add(chunked._row_kernel, dtype, dict(BLOCK_V=c["BLOCK_V"], HAS_BIAS=True, HAS_SOFTCAP=True) | flags,
                    c["num_warps"], label=f"BLOCK_V {c['BLOCK_V']} w{c['num_warps']} {mode}")
    return out


def signature(fn, consts: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = ("*" + TYPES[dtype] if arg in INPUT_POINTERS else "*i64" if arg in I64_POINTERS
                        else "*i32" if arg in I32_POINTERS else "*fp32")
        else:
            sig[arg] = "i32" if arg in INT_SCALARS else "fp32"
        if sig[arg].startswith("*") or arg in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(job: dict) -> dict:
    fn, consts, dtype = job["fn"], job["consts"], job["dtype"]
    sig, attrs = signature(fn, consts, dtype)
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=job["opts"])
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(kernel.asm["cubin"])
        info = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx_path, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([NVDISASM, cubin_path], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    atomics = re.findall(r"\b(?:atom|red)\.[\w.]+", ptx)
    return dict(
        kernel=fn.__name__, dtype=TYPES[dtype], config=job["label"],
        registers=int(regs.group(1)) if regs else None,
        shared=kernel.metadata.shared,
        spills=sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)),
        wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"),
        atomics=len(atomics),
        ordered_atomics=sum(1 for a in atomics if re.search(r"\.(acq_rel|acquire|release|seq_cst)\b", a)),
        # GPU- or system-scope fences order memory for other SMs; CTA-scope proxy fences (wgmma,
        # cp.async) are local and free of that cost.
        gpu_fences=len(re.findall(r"\b(?:fence\.(?:acq_rel|sc|acquire|release)\.(?:gpu|sys)|membar\.(?:gl|sys))\b", ptx)),
        sass_gpu_barriers=len(re.findall(r"\bMEMBAR\.\w*\.?(?:GPU|SYS)\b|\bERRBAR\b", sass)),
        sass_returning_atomics=len(re.findall(r"\bATOMG\b", sass)),
        sass_reductions=len(re.findall(r"\bREDG\b", sass)),
    )


def markdown(report: list[dict]) -> list[str]:
    lines = ["# Loss kernels compiled for sm_90a (H100/H200), no GPU involved", "",
             f"triton {triton.__version__}, torch {torch.__version__.split('+')[0]}; written by "
             "`python bench/kernels_sm90.py` (run by tests/test_loss_triton.py). Registers and spills from "
             "`ptxas -v`, shared memory from the compiled kernel, instruction counts from the PTX and, for "
             "barriers and atomics, the SASS (nvdisasm). The tiled kernels' configurations are the ones "
             "`triton.autotune` chooses among; the row kernel's are `ROW_CONFIGS` (chunked path).", "",
             "| kernel | dtype | configuration | registers | shared KiB | spill bytes | wgmma | cp.async | atomics "
             "(PTX) | ordered atomics | GPU-scope fences (PTX) | GPU-scope barriers (SASS) | REDG / ATOMG (SASS) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['registers']} | {r['shared'] / 1024:.1f} "
                     f"| {r['spills']} | {r['wgmma']} | {r['cp_async']} | {r['atomics']} | {r['ordered_atomics']} "
                     f"| {r['gpu_fences']} | {r['sass_gpu_barriers']} | {r['sass_reductions']} / "
                     f"{r['sass_returning_atomics']} |")
    return lines


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "kernels_sm90.md"), help="markdown report (JSON beside it)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels_sm90.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    for tool in (PTXAS, NVDISASM):
        if not os.path.exists(tool):
            sys.exit(f"kernels_sm90.py: {tool} is missing: this triton wheel ships no CUDA toolchain")
    # The detectors are checked first on a kernel that has what they look for.
    probe = compile_one(dict(fn=_ordered_atomic_probe, dtype=torch.float32, consts={}, opts=dict(num_warps=4),
                             label="probe"))
    if not (probe["ordered_atomics"] and probe["sass_gpu_barriers"] and probe["sass_returning_atomics"]):
        sys.exit(f"kernels_sm90.py: the atomic/barrier detectors missed a default-semantics atomic_add: {probe}")
    report = [compile_one(job) for job in jobs()]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for path, text in ((a.out, "\n".join(markdown(report)) + "\n"),
                       (os.path.splitext(a.out)[0] + ".json", json.dumps(report, indent=1) + "\n")):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
