"""End to end on a user's own model folder and jsonl tasks: train with SFT, check the outputs."""
from __future__ import annotations

import json
import os

import pytest
from conftest import write_jsonl
from hf_reference import assert_reproduces_evaluation

from msft_fast.config import load_config
from msft_fast.data.tasks import load_tasks
from msft_fast.errors import OutputError

pytestmark = pytest.mark.slow


def _config(tmp_path, demo_dir, model_dir, *overrides):
    chat = [json.loads(line) for line in open(demo_dir / "upper" / "train.jsonl")]
    yaml_text = f"""
method: sft
output_dir: {tmp_path / 'run'}
model: {{path: {model_dir}}}
data:
  tasks:
    - {{name: upper, train: {write_jsonl(tmp_path / 'upper.jsonl', chat)}, val_fraction: 0.2}}
    - {{name: add, train: {demo_dir / 'add' / 'train.jsonl'}, val: {demo_dir / 'add' / 'val.jsonl'}}}
    - {{name: reverse, train: {demo_dir / 'reverse' / 'train.jsonl'}, val: {demo_dir / 'reverse' / 'val.jsonl'}}}
  max_seq_len: 64
  tokens_per_batch: 512
  cache_dir: {tmp_path / 'cache'}
train: {{lr: 3.0e-3, epochs: 2, warmup_steps: 2, progress: false}}
msft: {{evals_per_epoch: 2}}
"""
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    return load_config(str(path), list(overrides))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_dir, user_model_dir):
    from msft_fast.run import train

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = _config(tmp, demo_dir, user_model_dir)
    history = train(cfg)
    return cfg, history


def test_history_has_every_contract_field(finished_run):
    cfg, history = finished_run
    on_disk = json.load(open(os.path.join(cfg.output_dir, "history.json")))
    assert on_disk == json.loads(json.dumps(history))
    assert on_disk["status"] == "finished" and on_disk["method"] == "sft"
    assert on_disk["tasks"] == ["upper", "add", "reverse"]
    evals = on_disk["evals"]
    assert [e["eval_id"] for e in evals] == list(range(5))  # start + every half epoch for 2 epochs
    # Evaluations fall on the optimizer step nearest each half epoch (53 steps per epoch here).
    assert [e["epoch"] for e in evals] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0], abs=0.02)
    for e in evals:
        assert set(e) >= {"eval_id", "step", "epoch", "stage", "train_flops", "eval_flops", "tasks"}
        for name in on_disk["tasks"]:
            assert set(e["tasks"][name]) >= {"val_loss", "val_token_acc", "active"}
            assert 0.0 <= e["tasks"][name]["val_token_acc"] <= 1.0
    steps = [e["step"] for e in evals]
    assert steps == sorted(steps) and steps[0] == 0
    assert [e["train_flops"] for e in evals] == sorted(e["train_flops"] for e in evals)
    assert evals[0]["train_flops"] == 0 and evals[-1]["train_flops"] > 0
    assert all(e["kept_train_flops"] == e["train_flops"] for e in evals)  # SFT never rolls back
    best = evals[on_disk["final"]["eval_id"]]
    assert on_disk["totals"]["final_kept_train_flops"] == best["kept_train_flops"]
    [stage] = on_disk["stages"]
    assert {k: stage[k] for k in ("stage", "excluded", "rollback_to_eval", "start_eval", "end_eval")} == {
        "stage": 0, "excluded": None, "rollback_to_eval": None, "start_eval": 0, "end_eval": 4}
    assert stage["steps_discarded"] == 0 and stage["steps_kept"] == on_disk["totals"]["steps"]
    totals = on_disk["totals"]
    assert set(totals) >= {"train_flops", "eval_flops", "trained_tokens", "wall_seconds"}
    assert totals["train_flops"] == evals[-1]["train_flops"]
    assert totals["eval_flops"] == evals[-1]["eval_flops"] == 5 * evals[0]["eval_flops"]
    metrics = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == list(range(1, totals["steps"] + 1))
    assert sum(m["tokens"] for m in metrics) == totals["trained_tokens"]
    # Throughput and its breakdown (checked against known delays below); no MFU on a CPU (no peak).
    for m in metrics:
        assert set(m["time"]) == {"data", "fwd_bwd", "optimizer"} and min(m["time"].values()) >= 0
        assert m["tokens"] / m["step_seconds"] == pytest.approx(m["tokens_per_s"])
        assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"]) and "mfu" not in m
        assert m["peak_mem_gib"] > 0
    assert totals["tokens_per_s"] == pytest.approx(totals["trained_tokens"] / totals["train_seconds"])
    assert totals["mfu"] is None and totals["bad_steps"] == 0
    # Packing: each epoch plan trained, once (2 epochs), with how its steps mix the tasks; the
    # recorded shares are those of metrics.jsonl's steps.
    packing = on_disk["packing"]
    assert [(e["epoch"], e["tasks"]) for e in packing["epochs"]] == [(0, on_disk["tasks"]), (1, on_disk["tasks"])]
    assert sum(e["steps"] for e in packing["epochs"]) == totals["steps"]
    assert 0 <= packing["mixing_tv"] <= 0.25 and 0 <= packing["padding"] <= 0.05
    assert packing["padding"] == pytest.approx(sum(e["padding"] * e["steps"] for e in packing["epochs"])
                                               / totals["steps"], abs=1e-6)
    first = packing["epochs"][0]
    epoch0 = [m for m in metrics if m["epoch"] <= 1.0]
    share = {t: sum(m["tasks"].get(t, {}).get("tokens", 0) for m in epoch0) for t in on_disk["tasks"]}
    tv = sum(0.5 * sum(abs(m["tasks"].get(t, {}).get("tokens", 0) / m["loss_tokens"] - share[t] / sum(share.values()))
                       for t in on_disk["tasks"]) for m in epoch0) / len(epoch0)
    assert len(epoch0) == first["steps"] and tv == pytest.approx(first["mixing_tv"], abs=1e-5)


def test_the_step_time_split_puts_each_known_delay_in_its_own_part(tmp_path, demo_dir, monkeypatch):
    """Sleeps of known length in the data loading, in every training forward (2 micro-batches a
    step) and in the optimizer step land each in its own part of metrics.jsonl's time split, and
    step_seconds holds them all within the call to train_step timed from outside."""
    import time

    import torch

    from msft_fast.data.loader import MixtureLoader
    from msft_fast.model import CausalLMWithTaskLoss
    from msft_fast.run import train
    from msft_fast.training.trainer import Trainer

    # Each delay is larger than the real work of any part on micro-batches of 128 tokens (a few ms
    # for data and optimizer, about 0.1 s for forward + backward on a loaded machine), so a delay
    # counted in the wrong part shows.
    delay = {"data": 0.4, "fwd_bwd": 2 * 0.3, "optimizer": 1.0}

    def slowed(owner, name, seconds, when=lambda: True):
        original = getattr(owner, name)

        def slow(*args, **kwargs):
            if when():
                time.sleep(seconds)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, slow)

    slowed(MixtureLoader, "step_batches", delay["data"])
    slowed(CausalLMWithTaskLoss, "forward", delay["fwd_bwd"] / 2, when=torch.is_grad_enabled)  # per micro-batch
    slowed(torch.optim.AdamW, "step", delay["optimizer"])
    outside = []
    original_step = Trainer.train_step

    def timed_step(self):
        t0 = time.perf_counter()
        record = original_step(self)
        outside.append(time.perf_counter() - t0)
        return record

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    cfg = _config(tmp_path, demo_dir, "builtin:tiny-llama", "data.tokens_per_batch=128", "train.epochs=0.04",
                  "train.grad_accum=2", "msft.evals_per_epoch=1")
    train(cfg)
    metrics = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert len(metrics) == len(outside) >= 3
    for m, whole in zip(metrics, outside):
        assert sum(m["time"].values()) <= m["step_seconds"] + 1e-6  # the parts do not overlap
        assert sum(delay.values()) <= m["step_seconds"] <= whole + 1e-6
        for part, seconds in delay.items():
            assert m["time"][part] >= seconds - 1e-3, (part, m["time"])
    # What a part holds beyond its own delay is real work: on its quickest step less than any other
    # part's delay, so no part also holds another's delay.
    for part, seconds in delay.items():
        others = min(v for k, v in delay.items() if k != part)
        assert min(m["time"][part] - seconds for m in metrics) < others, (part, [m["time"] for m in metrics])
    assert min(whole - m["step_seconds"] for m, whole in zip(metrics, outside)) < min(delay.values())


def test_mfu_uses_the_dense_peak_of_the_device(monkeypatch):
    import torch

    from msft_fast.flops import device_peak_flops

    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
                       ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA RTX 9000", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _n=name: _n)
        assert device_peak_flops(cuda, bf16) == peak, name
    assert device_peak_flops(cuda, torch.float32) is None  # fp32 has no tensor-core peak to compare with
    assert device_peak_flops(torch.device("cpu"), bf16) is None
    assert device_peak_flops(torch.device("cpu"), torch.float32, override_tflops=2.5) == 2.5e12


def test_validation_loss_falls_and_final_is_the_best_pooled_eval(finished_run):
    _, history = finished_run
    pooled = [e["pooled_val_loss"] for e in history["evals"]]
    assert pooled[-1] < pooled[0] - 0.5
    best = min(range(len(pooled)), key=pooled.__getitem__)
    assert history["final"]["eval_id"] == best and history["final"]["pooled_val_loss"] == pooled[best]
    assert history["final"]["pooled_metric"] == pooled[best]  # the default metric is val_loss


def _assert_final_reproduces_history(cfg, history):
    """An independent check of packing, loss, snapshot and export: plain HF, one document at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final_dir = os.path.join(cfg.output_dir, "final")
    assert os.path.isfile(os.path.join(final_dir, "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    assert_reproduces_evaluation(final_dir, load_tasks(cfg.data, tokenizer), history["evals"][history["final"]["eval_id"]])
    return AutoModelForCausalLM.from_pretrained(final_dir), tokenizer


def test_final_folder_loads_in_hf_and_reproduces_the_recorded_validation_loss(finished_run):
    cfg, history = finished_run
    model, tokenizer = _assert_final_reproduces_history(cfg, history)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.chat_template


def test_final_holds_the_best_evaluation_when_it_is_not_the_last(tmp_path, demo_dir, user_model_dir):
    """A learning rate far too high: the best pooled loss comes early, and final/ must be that state
    (embeddings and head included, which FSDP2 keeps unsharded after an evaluation)."""
    from msft_fast.run import train

    cfg = _config(tmp_path, demo_dir, user_model_dir, "train.lr=3.0", "train.schedule=constant",
                  "train.grad_clip=0", "train.warmup_steps=0", "train.epochs=1", "msft.evals_per_epoch=4")
    history = train(cfg)
    assert history["final"]["eval_id"] < len(history["evals"]) - 1
    _assert_final_reproduces_history(cfg, history)


def test_a_finished_run_is_not_overwritten_unless_asked(finished_run):
    from msft_fast.run import train

    cfg, _ = finished_run
    with pytest.raises(OutputError, match="finished run; pass --overwrite"):
        train(cfg)


def test_fractional_epochs_take_exactly_the_planned_steps(tmp_path, demo_dir):
    """train.epochs=0.8 with 4 evaluations per epoch: evaluations at 0, .25, .5, .75 and .8."""
    from msft_fast.methods.records import eval_points
    from msft_fast.run import train

    assert eval_points(0.0, 0.8, 4) == [0.25, 0.5, 0.75, 0.8]
    assert eval_points(0.0, 2, 2) == [0.5, 1.0, 1.5, 2.0]
    assert eval_points(1.5, 1.0, 2) == [2.0, 2.5]
    cfg = _config(tmp_path, demo_dir, "builtin:tiny-llama", "train.epochs=0.8", "msft.evals_per_epoch=4")
    history = train(cfg)
    evals = history["evals"]
    assert [e["epoch"] for e in evals] == pytest.approx([0, 0.25, 0.5, 0.75, 0.8], abs=0.03)
    metrics = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert len(metrics) == history["totals"]["steps"] == evals[-1]["step"]
    assert metrics[-1]["epoch"] == pytest.approx(0.8, abs=0.02)
