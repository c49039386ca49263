"""What the benchmarks share: the machine a result was measured on, and writing a result (JSON and a
markdown table, each written whole)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info() -> dict:
    import torch
    import transformers

    info = {"cores": os.cpu_count(), "cpu": platform.processor() or "?", "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    info["versions"] = {}
    for package in ("triton", "datasets", "accelerate", "flash-attn", "liger-kernel", "cut-cross-entropy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info["versions"][package] = metadata.version(package)
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = os.environ.get("GIT_COMMIT") or subprocess.check_output(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    return info


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_outputs(out_dir: str, stem: str, report: dict, lines: list[str], quiet: bool = False) -> None:
    """stem.json and stem.md, each written whole (renamed into place: a killed run leaves no half file)."""
    os.makedirs(out_dir, exist_ok=True)
    for ext, text in ((".json", json.dumps(report, indent=2, default=str)), (".md", "\n".join(lines))):
        path = os.path.join(out_dir, stem + ext)
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    if not quiet:
        print("\n".join(lines), flush=True)
