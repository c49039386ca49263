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
    from msft_fast.state.export import export_hf_folder
    from msft_fast.training.trainer import Trainer

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
    import msft_fast.state.snapshot as snapshot
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


def _state_of(trainer) -> dict:
    """Everything a restore must put back, copied: weights, Adam state, schedule, counters, RNG."""
    import copy
    import dataclasses

    return {
        "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "adam": {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in trainer.optimizer.state[p].items()}
                 for n, p in trainer.model.named_parameters() if p in trainer.optimizer.state},
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "lr": [g["lr"] for g in trainer.optimizer.param_groups],
        "counters": dataclasses.asdict(trainer.counters),
        "active": trainer.loader.active,
        "rng": torch.get_rng_state().clone(),
    }


# What a roll-back restores (the position of the state) and what it never rolls back (what was spent).
POSITION = ("step", "epoch", "step_in_epoch", "kept_train_flops")
SPENT = ("steps_trained", "train_flops", "eval_flops", "trained_tokens", "loss_tokens", "eval_tokens")


@pytest.mark.parametrize("mode", ["full", "weights"])
def test_a_restore_puts_back_the_whole_trainer_position(tmp_path, demo_dir, monkeypatch, mode):
    """mSFT with two roll-backs to mid-roll-out states, a cosine schedule with warm-up and 2
    micro-batches per step: right after each restore the trainer holds exactly what it held when
    that state was captured: weights, lr schedule (position and the lr it set), counters, active
    tasks, and with msft.restore=full the Adam state and the RNG bitwise; with `weights` the
    optimizer starts empty (the paper's fresh optimizer) while the schedule still continues from
    the restored position. What was spent (steps, FLOPs, tokens) is never rolled back."""
    import metric_callbacks

    from conftest import demo_tasks
    from msft_fast.training.trainer import Trainer

    captured, checked = {}, []
    original_capture, original_restore = Trainer.capture, Trainer.restore

    def capture(self):
        snap = original_capture(self)
        captured[id(snap)] = _state_of(self)
        torch.rand(7)  # as dropout would: training moves the RNG on, a full restore must put it back
        return snap

    def checked_restore(self, snap, weights_only=False):
        before = _state_of(self)
        original_restore(self, snap, weights_only=weights_only)
        if id(snap) not in captured:
            return
        want, got = captured[id(snap)], _state_of(self)
        assert got["weights"].keys() == want["weights"].keys()
        assert all(torch.equal(got["weights"][n], want["weights"][n]) for n in want["weights"])
        assert got["scheduler"] == want["scheduler"] and got["lr"] == want["lr"]
        assert {k: got["counters"][k] for k in POSITION} == {k: want["counters"][k] for k in POSITION}
        assert {k: got["counters"][k] for k in SPENT} == {k: before["counters"][k] for k in SPENT}
        assert got["active"] == want["active"]
        if weights_only:
            assert got["adam"] == {} and not self.optimizer.state
        else:
            assert got["adam"].keys() == want["adam"].keys() and want["adam"]
            for n, state in want["adam"].items():
                assert state.keys() == got["adam"][n].keys()
                assert all(torch.equal(got["adam"][n][k], v) if torch.is_tensor(v) else got["adam"][n][k] == v
                           for k, v in state.items()), n
            assert torch.equal(got["rng"], want["rng"])
        checked.append((self.counters.step, want["lr"][0]))

    monkeypatch.setattr(Trainer, "capture", capture)
    monkeypatch.setattr(Trainer, "restore", checked_restore)
    metric_callbacks.TWO_ROLLBACKS[0] = 0
    history = _train(tmp_path, demo_dir, str(tmp_path / "run"), "method=msft",
                     f"data.tasks=[{demo_tasks(demo_dir, ('upper', 'sort'))}]", "train.schedule=cosine",
                     "train.warmup_steps=3", "train.grad_accum=2", "train.epochs=2", "msft.budget_epochs=0.5",
                     "msft.metric=metric_callbacks:two_rollbacks", f"msft.restore={mode}")
    rollbacks = [(s["excluded"], s["rollback_to_eval"]) for s in history["stages"] if s["excluded"]]
    assert rollbacks == [("upper", 1), ("sort", 3)]
    # Two roll-backs and the final restore, each to a mid-roll-out state of its own schedule position.
    assert len(checked) == 3 and len({lr for _, lr in checked[:2]}) == 2 and all(step > 0 for step, _ in checked)
