"""The optimizer: AdamW fused wherever torch has a kernel for the parameters (CUDA and CPU), the
same update as foreach AdamW up to float rounding, and foreach where there is no fused kernel."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from msft_fast.config import TrainConfig
from msft_fast.training.optim import build_optimizer


def _steps(model, optimizer, steps=5, seed=0):
    """`steps` updates from fixed random gradients; returns the parameters and Adam state after them."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()])


def test_adamw_is_fused_on_a_cpu_and_updates_as_foreach_does(tokenizer):
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95)
    fused_model, foreach_model = tiny_llama(tokenizer), tiny_llama(tokenizer)
    fused = build_optimizer(fused_model, cfg)
    assert all(g["fused"] for g in fused.param_groups)
    # weight decay on matrices only
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in fused.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in fused.param_groups[1]["params"]) and fused.param_groups[1]["params"]
    reference = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                   for g in build_optimizer(foreach_model, cfg).param_groups],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=True)
    params, state = _steps(fused_model, fused)
    params_ref, state_ref = _steps(foreach_model, reference)
    moved = [not torch.equal(a, b) for a, b in zip(params, [p.detach() for p in tiny_llama(tokenizer).parameters()])]
    assert all(moved)
    for a, b in zip(params, params_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # float rounding, not another update rule
    for a, b in zip(state, state_ref):
        assert a.keys() == b.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-9)


def test_adamw_falls_back_to_foreach_where_torch_has_no_fused_kernel(tokenizer, monkeypatch):
    real = torch.optim.AdamW

    def no_fused_kernel(params, fused=None, **kwargs):  # what torch raises for an unsupported device or dtype
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices")
        return real(params, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    optimizer = build_optimizer(tiny_llama(tokenizer), TrainConfig())
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)
