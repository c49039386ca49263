#!/usr/bin/env bash
# Gather, here, the wheels bench/gpu_check.sh needs on the GPU machine, which has no package registry and
# lacks them (/work/.library/device/KINDS.md): datasets and the two of its requirements the image lacks
# (dill, multiprocess); transformers at requirements/dev-cpu.txt's pin (the check keeps the image's if the
# carried one does not import there); liger-kernel and cut-cross-entropy, the loss benchmark's peers.
# flash-attn has no wheel on PyPI and its release wheels (200 MB and more) exceed the 64 MiB a device call
# carries: the check reports it "not installed". CPython 3.12 x86-64 manylinux wheels go to .whl/
# (git-ignored), which the device call carries (docs/gpu.md):
#   bash bench/gather_wheels.sh            # about 16 MB
set -u
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
[ -n "${PYTHON:-}" ] || if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
pin() { grep -i "^$1==" requirements/dev-cpu.txt | head -n 1 | cut -d= -f3; }
WANTED=("datasets==$(pin datasets)" "dill==0.4.1" "multiprocess==0.70.19" "transformers==$(pin transformers)"
        "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "flash-attn")
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$DEST"
for spec in "${WANTED[@]}"; do
    if "$PYTHON" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "$spec" > "$DEST/.download.log" 2>&1; then
        echo "gathered  $spec"
    else
        echo "not available: $spec ($(grep -m 1 -i 'error' "$DEST/.download.log" | cut -c1-120))"
    fi
done
rm -f "$DEST/.download.log"
total=$(du -cb "$DEST"/*.whl 2>/dev/null | tail -n 1 | cut -f1)
echo "$(ls "$DEST"/*.whl 2>/dev/null | wc -l) wheels in $DEST, $((${total:-0} / 1048576)) MiB" \
    "(a device call carries 64 MiB with the working tree)"
[ "${total:-0}" -gt $((48 * 1048576)) ] && echo "warning: over 48 MiB of wheels leaves little room for the tree"
exit 0
