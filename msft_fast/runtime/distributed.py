"""Process group setup and the one place that applies FSDP2 to the model.

`msft-fast train` without torchrun gets a one-rank group, so the same code path runs at every
world size. One process on a CPU in fp32 is the one case where `parallelize` leaves FSDP2 out
(`train.fsdp: auto`): with nothing to shard, gather or cast, its per-block hooks only cost time.
Everything downstream (step loop, snapshots, checkpoints, export) works on either kind of model
through the helpers here, which do nothing for a plain module.
"""
from __future__ import annotations

import gc
import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # A gloo group of its own for asynchronous checkpoints: their writer thread runs collectives while
    # training runs its own, and two threads' collectives on one group mix up each other's messages.
    checkpoint_group: Optional[dist.ProcessGroup] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cpu_backend_too: bool = False) -> DistContext:
    """Join the torchrun group, or create a one-rank group when launched without torchrun.
    cpu_backend_too: asynchronous checkpoints will run: on GPUs also give the group gloo for CPU
    tensors, and make the writer's own gloo group (`DistContext.checkpoint_group`)."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo" if cpu_backend_too else "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        else:  # an in-process store: no port to pick, nothing left in os.environ
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    # Measured: on 2 gloo ranks, an asynchronous checkpoint's writer sharing the training group
    # aborted the run ("Received data size doesn't match expected size").
    group = dist.new_group(backend="gloo") if cpu_backend_too else None
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, group)


def shutdown_distributed() -> None:
    """Leave the process group, and let it end (with gloo's worker threads) now, not at exit.

    destroy_process_group only unregisters the group: the C++ object and its threads live while
    anything refers to it. DTensor's caches (sharding propagation, redistribution plans) keep every
    DeviceMesh that FSDP2's parameters passed through, and with it the group, until the process
    exits; its threads then meet interpreter finalization, which now and then aborts a worker after
    a finished run ("terminate called without an active exception", exit -6, and torchrun reports a
    failure; seen in about 1 of 20 two-rank gloo runs). So the caches are emptied here and the
    group's last holders collected: the caller drops its own (the model) first."""
    if not dist.is_initialized():
        return
    _clear_dtensor_caches()
    dist.destroy_process_group()
    gc.collect()


def _clear_dtensor_caches() -> None:
    """Empty the DTensor caches that hold meshes: sharding propagation (Python and C++),
    redistribution plans and planners, mesh topology. All are private to torch, so each is looked
    up with care: one that moved in another release is skipped here, and tests/test_teardown.py
    fails instead."""
    for module, path in (("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
                         # torch 2.8 (the floor) has no helper for this one; its cache is thread-local
                         ("torch.distributed.tensor", "DTensor._op_dispatcher.sharding_propagator."
                                                      "propagate_op_sharding.cache.cache_clear"),
                         ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
                         ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
                         ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear")):
        try:
            fn = importlib.import_module(module)
            for name in path.split("."):
                fn = getattr(fn, name)
        except (ImportError, AttributeError):
            continue
        fn()


def parallelize(model: nn.Module, blocks: list[nn.Module], param_dtype: torch.dtype, device: torch.device, *,
                activation_checkpointing: str = "off", checkpoint_every: int = 2, compile: bool = False,
                replicas: int = 1, fsdp: str = "auto") -> nn.Module:
    """Apply, in this order, activation checkpointing and `torch.compile` to each decoder block, then
    `fully_shard` each block, then the root (`model`, which owns embeddings and head).

    The model may sit on the CPU: each rank moves only its own shards to `device`, so no device
    ever holds the whole model. Parameters stay fp32 (the optimizer's master copy); compute runs
    in `param_dtype` and gradients are reduced in fp32. Both wrappers patch `forward` in place, so
    parameter names (and the exported HF folder) stay those of the plain model.

    activation_checkpointing: "off"; "full" (every block recomputes its forward in backward);
        "selective" (every `checkpoint_every`-th block: memory and recompute in between).
    replicas > 1: HSDP, parameters replicated over `replicas` groups (across nodes) and sharded
        within each (a node); gradients are reduce-scattered in the group, then all-reduced across.
    fsdp: "auto" shards unless `needs_fsdp` says it buys nothing; "always" shards in every case.
    """
    for i, block in enumerate(blocks):
        if activation_checkpointing == "full" or (activation_checkpointing == "selective" and i % checkpoint_every == 0):
            _checkpoint_forward(block)
        if compile:
            block.compile()  # in place: the module and its parameter names stay the same
    if fsdp != "always" and not needs_fsdp(param_dtype, device):
        return model
    mesh = device_mesh(device, replicas)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(blocks):
        # The last block's parameters would be gathered again at once for its backward: keep them
        # (torchtitan does the same); every other block frees its gathered copy after forward.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if dist.get_backend() == "gloo":
        # gloo's reduce_scatter_tensor sums where FSDP2 asks for ReduceOp.AVG on torch 2.8 (measured:
        # [1, 2] gives 3, not 1.5; all_reduce averages), which doubled 2-rank gradients there. Plain
        # sums with FSDP2's own division are right on every torch; NCCL keeps its native average.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model


def needs_fsdp(param_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether FSDP2 does anything for this process: shard over several ranks, cast to a compute dtype
    (bf16 masters stay fp32), or move a CPU-built model onto its device shard by shard. One CPU
    process in fp32 needs none of that: its hooks would gather, copy and reduce over a group of one
    (8-12% of a small model's step, measured), so the model stays a plain module there."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return world > 1 or param_dtype != torch.float32 or device.type != "cpu"


def unshard(model: nn.Module) -> None:
    """Gather the root's parameters (embeddings, head) for a forward outside the model's own (the
    blocks gather in their own hooks); nothing to do for a plain module."""
    if isinstance(model, FSDPModule):
        model.unshard()


def device_mesh(device: torch.device, replicas: int = 1):
    """1-D mesh over all ranks (FSDP), or 2-D (replicate, shard) for HSDP."""
    world = dist.get_world_size()
    if replicas <= 1:
        return init_device_mesh(device.type, (world,))
    if world % replicas:
        raise ValueError(f"world size {world} is not a multiple of train.hsdp_replicas={replicas}")
    return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def reshard_all(model: nn.Module) -> None:
    """Free every gathered parameter copy: a forward without backward (an evaluation) leaves the
    root, and blocks that keep their parameters after forward, unsharded."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def set_gradient_sync(model: nn.Module, last_micro_batch: bool, mode: str = "step") -> None:
    """Choose the gradient reductions FSDP2 runs after the backward of the coming micro-batch.

    mode "step" (train.grad_sync): none until the last micro-batch of the optimizer step; until then
        each rank accumulates its unsharded gradients in fp32 (4 bytes per parameter of the whole
        model per rank: memory the preflight counts), then every FSDP unit reduce-scatters once per step.
    mode "micro_batch": reduce-scatter after every micro-batch, so gradients stay sharded; with HSDP
        the all-reduce across replicas still runs once per step.
    """
    if not isinstance(model, FSDPModule):
        return
    if mode == "step":
        model.set_requires_gradient_sync(last_micro_batch)
    else:
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last_micro_batch)  # only HSDP has an all-reduce to defer


def _checkpoint_forward(block: nn.Module) -> None:
    forward = block.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks. Integer counts stay exact (gloo and nccl both sum int64)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
