"""Train with `msft_fast.run.train` and save the gradients of the first optimizer step just before
the update (full tensors, gathered over every rank; rank 0 writes them), for test_gradients.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/first_step_gradients.py OUT.pt key=value ...
"""
from __future__ import annotations

import sys

import torch


def train_saving_first_gradients(cfg, out_path: str) -> dict:
    """Run `cfg`; {parameter name: gradient} of step 1 go to `out_path` (names as in the trainer's
    model: `lm.` + the HF name). Returns the run's history."""
    from msft_fast.run import train
    from msft_fast.training.trainer import Trainer

    trainers, saved = [], []
    original_init, original_step = Trainer.__init__, torch.optim.AdamW.step

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        trainers.append(self)

    def step(self, *args, **kwargs):
        if not saved:  # every rank is here: full_tensor() gathers the shards
            trainer = trainers[-1]
            grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                     for name, p in trainer.model.named_parameters()}
            saved.append(True)
            if trainer.ctx.is_main:
                torch.save(grads, out_path)
        return original_step(self, *args, **kwargs)

    Trainer.__init__, torch.optim.AdamW.step = init, step
    try:
        return train(cfg)
    finally:
        Trainer.__init__, torch.optim.AdamW.step = original_init, original_step


if __name__ == "__main__":
    from msft_fast.config import load_config

    torch.set_num_threads(1)
    train_saving_first_gradients(load_config(None, sys.argv[2:]), sys.argv[1])
