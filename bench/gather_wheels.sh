#!/usr/bin/env bash
# Gather, on this machine, the wheels bench/gpu_check.sh needs on the GPU machine but that machine lacks
# (it has no package registry; its image, /work/.library/device/KINDS.md, has torch, triton, transformers,
# accelerate, safetensors, pyarrow, pandas, xxhash, but not these):
#   datasets, and the two of its requirements the image lacks (dill, multiprocess): msft-fast reads tasks with it;
#   transformers at the version requirements/dev-cpu.txt pins (the image has an older one; the check
#     keeps the image's if the carried one does not import there);
#   liger-kernel and cut-cross-entropy: the loss benchmark's peers (bench/bench_ce.py).
# flash-attn publishes no wheel on PyPI (a source archive that needs CUDA to build), and its release
# wheels (about 200 MB and more) exceed the 64 MiB a device call can carry: the checks report it as
# "not available" and train with FlexAttention.
#
# The wheels are for the GPU machine's Python (CPython 3.12, x86-64 manylinux) and go to .whl/ (git-ignored).
# The device tool carries them with the working tree, and gpu_check.sh installs them first thing:
#   bench/gather_wheels.sh                       # here; about 16 MB
#   device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 360 (docs/gpu.md)
set -u
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
pin() { grep -i "^$1==" requirements/dev-cpu.txt | head -n 1 | cut -d= -f3; }
WANTED=("datasets==$(pin datasets)" "dill==0.4.1" "multiprocess==0.70.19" "transformers==$(pin transformers)"
        "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "flash-attn")
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$DEST"
missing=()
for spec in "${WANTED[@]}"; do
    if "$PYTHON" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "$spec" > "$DEST/.download.log" 2>&1; then
        echo "gathered  $spec"
    else
        echo "not available: $spec ($(grep -m 1 -i 'error' "$DEST/.download.log" | cut -c1-120))"
        missing+=("$spec")
    fi
done
rm -f "$DEST/.download.log"
total=$(du -cb "$DEST"/*.whl 2>/dev/null | tail -n 1 | cut -f1)
echo "$(ls "$DEST"/*.whl 2>/dev/null | wc -l) wheels in $DEST, $((${total:-0} / 1048576)) MiB (a device call carries 64 MiB with the working tree)"
[ "${total:-0}" -gt $((48 * 1048576)) ] && echo "warning: more than 48 MiB of wheels leaves little room for the working tree"
exit 0
