"""A run leaves no process group behind when it ends, finished or stopped.

destroy_process_group only unregisters a group; it ends (and joins gloo's worker threads) when its
last holder goes. If something outlives the run (DTensor's caches of FSDP2 meshes did), the threads
meet interpreter finalization, which now and then aborts a worker after a finished run
("terminate called without an active exception", exit -6: torchrun then reports a failure).
These runs use FSDP2 on one in-process rank, so the same holders exist as on several."""
from __future__ import annotations

import gc
import os

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from conftest import demo_tasks

from msft_fast.errors import StopRequested

GLOO_THREADS = ("pt_gloo", "gloo_tcp")  # ProcessGroupGloo's run loops and its transport's event loop
THREAD_NAMES = os.path.isdir("/proc/self/task")  # read from Linux's /proc; the meshes are checked anywhere


def _gloo_threads() -> int:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended while we listed
            pass
    return sum(name.startswith(GLOO_THREADS) for name in names)


def _meshes() -> set[int]:
    return {id(o) for o in gc.get_objects() if type(o) is DeviceMesh}


def _overrides(tmp_path, demo_dir) -> list[str]:
    tasks = demo_tasks(demo_dir, ("upper", "sort"))
    return [f"output_dir={tmp_path / 'run'}", "method=sft", f"data.tasks=[{tasks}]", "data.max_seq_len=64",
            "data.tokens_per_batch=256", f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false",
            "train.epochs=1", "train.fsdp=always", "train.checkpoint_every=1000", "msft.evals_per_epoch=1"]


@pytest.mark.stack
@pytest.mark.parametrize("ending", ["finished", "stopped"])
def test_a_run_leaves_no_process_group_behind(tmp_path, demo_dir, monkeypatch, ending):
    from msft_fast.config import load_config
    from msft_fast.run import train
    from msft_fast.training.trainer import Trainer

    if ending == "stopped":  # as a SIGTERM after the second step would: checkpoint, then StopRequested
        step = Trainer.train_step

        def signalled_step(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            if self.counters.steps_trained == 2:
                self.stop_signal = "SIGTERM"
            return out

        monkeypatch.setattr(Trainer, "train_step", signalled_step)
    threads_before, meshes_before = _gloo_threads() if THREAD_NAMES else 0, _meshes()
    cfg = load_config(None, _overrides(tmp_path, demo_dir))
    if ending == "finished":
        assert train(cfg)["status"] == "finished"
    else:
        with pytest.raises(StopRequested):
            train(cfg)
    assert not dist.is_initialized()
    assert _meshes() <= meshes_before, "a DeviceMesh (and with it the process group) outlived the run"
    if THREAD_NAMES:
        assert _gloo_threads() <= threads_before, "gloo's worker threads outlived the run"
