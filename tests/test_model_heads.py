"""LM heads that transform the logits (soft-capping, scaling, a bias) train the function HF runs:
the fused loss gets the same transform, checked against HF's own logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msft_fast.data.packing import IGNORE_INDEX, _to_batch
from msft_fast.model import CausalLMWithTaskLoss, HeadTransform

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def _models():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, PhiConfig

    return {
        "gemma2_softcap": Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=3.0),
        "cohere_logit_scale": CohereConfig(**SMALL, logit_scale=0.4),
        "granite_logits_scaling": GraniteConfig(**SMALL, logits_scaling=2.5),
        "phi_head_bias": PhiConfig(**SMALL),
    }


@pytest.mark.parametrize("name", ["gemma2_softcap", "cohere_logit_scale", "granite_logits_scaling", "phi_head_bias"])
def test_the_loss_applies_the_heads_logit_transform(name):
    from transformers import AutoModelForCausalLM

    config = _models()[name]
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    head = lm.get_output_embeddings()
    torch.nn.init.normal_(head.weight, std=1.0)  # logits large enough for soft-capping to bite
    if getattr(head, "bias", None) is not None:
        torch.nn.init.normal_(head.bias, std=0.5)  # HF starts it at zero: make it matter
    wrapper = CausalLMWithTaskLoss(lm, num_tasks=1)
    assert wrapper.head_transform != HeadTransform() or head.bias is not None

    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.vocab_size, 23).astype(np.int32)
    labels = np.append(ids[1:], IGNORE_INDEX).astype(np.int32)
    labels[:5] = IGNORE_INDEX  # an unlabelled prompt
    batch = _to_batch([ids], [labels], [np.arange(len(ids))], [np.zeros(len(ids), np.int64)], [len(ids)])
    with torch.no_grad():
        loss, stats = wrapper(batch)
        logits = lm(input_ids=batch.input_ids[None], use_cache=False).logits[0].double()
    expect = torch.nn.functional.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.loss_sum.double().sum(), expect, rtol=1e-5, atol=1e-4)
    # Without the transform the loss would differ clearly: the check above has teeth.
    plain = torch.nn.functional.cross_entropy(
        (wrapper.hidden_states(batch) @ head.weight.T).double().detach(), batch.labels, ignore_index=IGNORE_INDEX,
        reduction="sum")
    assert abs(float(plain - expect)) > 1e-2
