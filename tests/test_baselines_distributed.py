"""IES and DynamixSFT on 1 rank with grad_accum=2 and on 2 ranks (torchrun, gloo, FSDP2) with
grad_accum=1 train alike: the same steps, losses to float rounding, the same documents mastered at
the same epoch ends (IES: per-document losses carried by the step's one reduction), the same
look-ahead updates and proportions (DynamixSFT: virtual steps undone on sharded state), and one
gradient reduction per FSDP unit per optimizer step. The 2-rank runs go through tests/train_runs.py
(which counts the gradient reductions); the 1-rank runs run in this process."""
from __future__ import annotations

import json
import os
import sys

import pytest
from test_distributed import _run, _write_config

from msft_fast.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

OPTIONS = {
    # 5 epochs with a rule that may master documents from the end of epoch 4 on.
    "ies": ["method=ies", "train.epochs=5", "ies.window=1", "ies.threshold=0.05", "msft.evals_per_epoch=1"],
    # A look-ahead update every 3 steps.
    "dynamix": ["method=dynamix", "train.epochs=2", "dynamix.update_every=3", "msft.evals_per_epoch=2"],
}


def test_ies_and_dynamix_match_on_one_and_two_ranks(tmp_path, demo_dir, user_model_dir):
    from msft_fast.run import train

    # train.epochs and msft.evals_per_epoch come from OPTIONS.
    config = _write_config(tmp_path, demo_dir, user_model_dir, names=("upper", "noisy_codes"), lr=3.0e-3)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    # One launch per method, so each stays within _run's time limit on a loaded machine.
    for method, options in OPTIONS.items():
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              os.path.join(tests_dir, "train_runs.py"), "--config", str(config), "train.grad_accum=1",
              "++", f"output_dir={tmp_path / ('two_' + method)}", *options], env)
    for method, options in OPTIONS.items():
        train(load_config(str(config), [f"output_dir={tmp_path / ('one_' + method)}", "train.grad_accum=2", *options]))

    for method in OPTIONS:
        one, two = tmp_path / f"one_{method}", tmp_path / f"two_{method}"
        m1, m2 = ([json.loads(line) for line in open(folder / "metrics.jsonl")] for folder in (one, two))
        assert len(m1) == len(m2) > 10
        for a, b in zip(m1, m2):
            assert (a["step"], a["tokens"], a["loss_tokens"]) == (b["step"], b["tokens"], b["loss_tokens"])
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            for name, task in a["tasks"].items():
                assert b["tasks"][name]["tokens"] == task["tokens"]
        h1, h2 = (json.load(open(folder / "history.json")) for folder in (one, two))
        assert (h1["world_size"], h2["world_size"]) == (1, 2) and h1["final"]["eval_id"] == h2["final"]["eval_id"]
        for e1, e2 in zip(h1["evals"], h2["evals"]):
            assert e1["step"] == e2["step"] and e1["train_flops"] == e2["train_flops"]
            assert e2["pooled_val_loss"] == pytest.approx(e1["pooled_val_loss"], rel=1e-5)
        if method == "ies":  # the same documents mastered at the same epoch ends
            assert h1["ies"]["decisions"] == h2["ies"]["decisions"]
            assert sum(h1["ies"]["mastered_docs"].values()) > 0
        else:  # the same updates, rewards and proportions, to float rounding
            u1, u2 = h1["dynamix"]["updates"], h2["dynamix"]["updates"]
            assert [u["step"] for u in u1] == [u["step"] for u in u2] == list(range(3, len(m1), 3))
            for a, b in zip(u1, u2):
                for key in ("rewards", "proportions"):
                    assert b[key] == pytest.approx(a[key], rel=1e-4)
                assert a["lookahead_flops"] == b["lookahead_flops"] > 0
        # One gradient reduce-scatter per FSDP unit (2 blocks + the root) per optimizer step, on each rank.
        for rank in (0, 1):
            steps = json.load(open(two / f"reductions-rank-{rank}.json"))
            assert len(steps) == len(m2)
            assert all(s["fsdp_units"] == 3 and s["units"] == s["reduce_scatters"] == 3 for s in steps)
