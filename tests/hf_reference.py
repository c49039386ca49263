"""Independent references for what the trainer records: plain HF forward passes, one document at a
time (no packing, no fused loss kernel, no FSDP), and `F.cross_entropy` on their logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msft_fast.data.formats import IGNORE_INDEX


def document(docs, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [n], labels [n]) of document i of a DocSet; labels[j] is the target of position j."""
    s, n = int(docs.starts[i]), int(docs.lengths[i])
    return (torch.from_numpy(docs.input_ids[s : s + n].astype("int64")),
            torch.from_numpy(docs.labels[s : s + n].astype("int64")))


def document_loss_sum(model, ids: torch.Tensor, labels: torch.Tensor, dtype=torch.float64) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy of one document through the plain HF model, and its trained tokens.
    Differentiable; the logits are cast to `dtype` before the loss."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0].to(dtype)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def validation_losses(model, tasks) -> dict[str, tuple[float, int]]:
    """{task name: (mean token loss, trained tokens)} over every validation document."""
    out = {}
    for task in tasks:
        loss_sum, tokens = 0.0, 0
        for i in range(len(task.val)):
            loss, n = document_loss_sum(model, *document(task.val, i))
            loss_sum, tokens = loss_sum + loss.item(), tokens + n
        out[task.name] = (loss_sum / tokens, tokens)
    return out


def assert_reproduces_evaluation(folder: str, tasks, evaluation: dict, rel: float = 1e-5) -> None:
    """The HF model folder, loaded with plain `from_pretrained`, gives every task the validation loss
    (and token count) that history.json recorded for `evaluation`."""
    import pytest
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for name, (loss, tokens) in validation_losses(model, tasks).items():
        recorded = evaluation["tasks"][name]
        assert tokens == recorded["val_tokens"], (folder, name)
        assert loss == pytest.approx(recorded["val_loss"], rel=rel), (folder, name, evaluation["eval_id"])
