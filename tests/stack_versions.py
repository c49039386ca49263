"""Prints the versions a test stage installed (make test, test-newest, test-floor print them first),
so that a log says which stack passed or failed."""
from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

STACK = ("torch", "triton", "transformers", "tokenizers", "datasets", "huggingface_hub", "accelerate",
         "safetensors", "kernels", "numpy", "pyarrow", "fsspec", "pyyaml", "tqdm", "matplotlib", "pytest")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in STACK:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


if __name__ == "__main__":
    label = sys.argv[1] if len(sys.argv) > 1 else "stack"
    print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in versions().items()), flush=True)
