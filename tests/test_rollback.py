"""mSFT roll-backs checked from the outside: the weights right after each roll-back, and final/,
loaded with plain HF `from_pretrained`, give every task the validation loss that history.json
recorded for the evaluation that roll-back (or the final choice) names. A wrong but deterministic
restore (another state, a part of the model left out) passes the resume and 1-vs-2-rank
comparisons; it fails here. Full restores, weights-only restores, and states spilled to disk.

How the weights get out: the test wraps `Trainer.restore` in its own process and, right after the
real restore, exports the live model with the run's own `export_hf_folder` (the code that writes
final/, itself checked here against final/'s recorded losses). The trainer knows nothing of it.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from hf_reference import assert_reproduces_evaluation
from safetensors.torch import load_file
from test_resume import _overrides, _train

from msft_fast.config import load_config
from msft_fast.data.tasks import load_tasks

pytestmark = pytest.mark.slow


def _run_exporting_each_restore(tmp_path, demo_dir, monkeypatch, *overrides):
    """Train mSFT; returns (history, [(folder exported right after a restore, was the state spilled)])."""
    from msft_fast.export import export_hf_folder
    from msft_fast.trainer import Trainer

    restored = []
    original = Trainer.restore

    def restore(self, snap, weights_only=False):
        spilled = snap.spilled is not None
        original(self, snap, weights_only=weights_only)
        folder = str(tmp_path / f"restored-{len(restored)}")
        export_hf_folder(self.model, self.tokenizer, folder, self.ctx.is_main, torch.float32)
        restored.append((folder, spilled))

    monkeypatch.setattr(Trainer, "restore", restore)
    history = _train(tmp_path, demo_dir, str(tmp_path / "run"), "method=msft", *overrides)
    return history, restored


def _small_host_memory(monkeypatch, states_in_memory: int) -> None:
    """Host memory for `states_in_memory` snapshot states of the built-in model (fp32 + Adam)."""
    import msft_fast.snapshot as snapshot
    from transformers import LlamaForCausalLM

    from msft_fast.builtin import char_tokenizer, tiny_llama_config

    params = sum(p.numel() for p in LlamaForCausalLM(tiny_llama_config(len(char_tokenizer()))).parameters())
    per_state = 3 * 4 * params
    monkeypatch.setattr(snapshot, "host_memory_available", lambda: int((states_in_memory + 0.5) * per_state / 0.8))


@pytest.mark.parametrize("restore,spill", [("full", False), ("weights", False), ("full", True)],
                         ids=["full", "weights", "full-spilled"])
def test_each_roll_back_and_final_hold_the_weights_of_the_evaluation_they_name(tmp_path, demo_dir, monkeypatch,
                                                                                restore, spill):
    overrides = [f"msft.restore={restore}", "train.checkpoint_every=0"]  # no checkpoints: not needed here
    if spill:
        _small_host_memory(monkeypatch, 1)
        overrides.append(f"msft.snapshot_spill_dir={tmp_path / 'spill'}")
    history, restored = _run_exporting_each_restore(tmp_path, demo_dir, monkeypatch, *overrides)
    if spill:
        assert history["snapshot_pool"]["in_memory_states"] == 1
        assert any(was_spilled for _, was_spilled in restored), "no roll-back read a spilled state"
    rollbacks = [s["rollback_to_eval"] for s in history["stages"] if s["excluded"] is not None]
    assert rollbacks, "the mixture overfits within the budget: some task must be excluded"
    claims = rollbacks + [history["final"]["eval_id"]]  # each roll-back, then the final choice
    assert len(restored) == len(claims)
    cfg = load_config(None, _overrides(tmp_path, demo_dir, str(tmp_path / "run")))
    from msft_fast.builtin import char_tokenizer

    tasks = load_tasks(cfg.data, char_tokenizer())
    evals = history["evals"]
    for (folder, _), eval_id in zip(restored, claims):
        assert_reproduces_evaluation(folder, tasks, evals[eval_id])
    # final/ is the state of the last restore, written by the run itself.
    final, last = (load_file(os.path.join(folder, "model.safetensors"))
                   for folder in (os.path.join(tmp_path, "run", "final"), restored[-1][0]))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    with open(tmp_path / "run" / "history.json") as f:
        assert json.load(f)["final"]["eval_id"] == claims[-1]
