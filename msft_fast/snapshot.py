"""Roll-back targets in host memory: each rank copies its own parameter shards, no collective.

Restoring copies the bytes back, so a restored model is bitwise the one that was captured.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def _sharded_params(model: nn.Module) -> list[torch.Tensor]:
    """This rank's shards. After a forward without backward (an evaluation) FSDP2 leaves the root's
    parameters unsharded, as temporary full copies: reshard first so we read and write the real
    shards, never those copies."""
    if isinstance(model, FSDPModule):
        model.reshard()
    params = list(model.parameters())
    if isinstance(model, FSDPModule) and not all(isinstance(p, DTensor) for p in params):
        raise RuntimeError("a snapshot needs every parameter sharded; some are still unsharded")
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


class ModelSnapshot:
    """A host copy of this rank's shard of every parameter."""

    def __init__(self, model: nn.Module):
        with torch.no_grad():
            self.tensors = [t.detach().to("cpu", copy=True) for t in _sharded_params(model)]

    def restore(self, model: nn.Module) -> None:
        local = _sharded_params(model)
        if len(local) != len(self.tensors) or any(a.shape != b.shape for a, b in zip(local, self.tensors)):
            raise RuntimeError("snapshot does not match the model it is restored into")
        with torch.no_grad():
            for dst, saved in zip(local, self.tensors):
                dst.copy_(saved, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
