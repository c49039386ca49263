"""Fused linear + cross-entropy with per-task statistics: the public kernel API.

The kernel sources live in the repository's top-level ``kernels/`` folder (beside the package, as in
flash-attention). That folder has no ``__init__.py`` on purpose: the checkout's root is first on
``sys.path`` under ``python -m``, ``torchrun -m`` and ``python -m pytest``, and a regular package named
``kernels`` there would shadow HF's ``kernels`` package, which transformers imports while loading
models. A folder without ``__init__.py`` is only a namespace portion, which any installed regular
package of that name outranks. In a checkout this package therefore reaches the sources through its
``__path__``; a wheel holds them beside this file (setup.py's build step copies them in).
"""
import os as _os

if not _os.path.isfile(_os.path.join(__path__[0], "fused_linear_cross_entropy.py")):
    __path__.append(_os.path.join(_os.path.dirname(_os.path.dirname(__path__[0])), "kernels"))

from .chunk_plan import DEFAULT_CHUNK_BYTES, ChunkPlan, plan_chunks  # noqa: E402
from .fused_linear_cross_entropy import fused_linear_cross_entropy, loss_memory_bytes  # noqa: E402
from .reference import TaskStats  # noqa: E402

__all__ = ["DEFAULT_CHUNK_BYTES", "ChunkPlan", "TaskStats", "fused_linear_cross_entropy", "loss_memory_bytes",
           "plan_chunks"]
