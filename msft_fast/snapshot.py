"""Roll-back targets in host memory: each rank copies its own parameter shards, no collective.

Restoring copies the bytes back, so a restored model is bitwise the one that was captured.
"""
from __future__ import annotations

import torch
from torch import nn


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # FSDP2 params are DTensors


class ModelSnapshot:
    """A host copy of this rank's shard of every parameter."""

    def __init__(self, model: nn.Module):
        with torch.no_grad():
            self.tensors = [_local(p).detach().to("cpu", copy=True) for p in model.parameters()]

    def restore(self, model: nn.Module) -> None:
        params = list(model.parameters())
        if len(params) != len(self.tensors):
            raise RuntimeError("snapshot does not match the model it is restored into")
        with torch.no_grad():
            for p, saved in zip(params, self.tensors):
                _local(p).copy_(saved, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
