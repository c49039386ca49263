"""Checks that turn deep failures into one clear sentence, and small run-level rules."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama

from msft_fast.config import load_config
from msft_fast.errors import ConfigError, ModelError


def _cfg(tmp_path, demo_dir, model, *overrides):
    tasks = [f"{{name: {n}, train: {demo_dir / n / 'train.jsonl'}, val: {demo_dir / n / 'val.jsonl'}}}"
             for n in ("upper", "sort")]
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.path={model}", f"data.tasks=[{', '.join(tasks)}]",
                              "data.max_seq_len=64", "data.tokens_per_batch=256", f"data.cache_dir={tmp_path / 'c'}",
                              "train.progress=false", *overrides])


def test_a_tokenizer_larger_than_the_embedding_is_one_clear_error(tmp_path, tokenizer, demo_dir):
    from msft_fast.run import train

    model = tiny_llama(tokenizer)
    model.resize_token_embeddings(60)  # the char tokenizer has 104 tokens
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match=r"token id \d+, but the model's embedding has only 60 rows"):
        train(_cfg(tmp_path, demo_dir, tmp_path / "m"))
    assert not os.path.exists(tmp_path / "run" / "history.json")


def test_too_few_epochs_for_one_step_is_a_config_error(tmp_path, demo_dir):
    from msft_fast.run import train

    with pytest.raises(ConfigError, match="train.epochs.*gives no optimizer step"):
        train(_cfg(tmp_path, demo_dir, "builtin:tiny-llama", "train.epochs=0.001"))


def test_evaluations_that_land_on_one_step_run_once(tmp_path, demo_dir):
    """Two steps per epoch and four evaluations per epoch: each step is evaluated once."""
    from msft_fast.run import train

    history = train(_cfg(tmp_path, demo_dir, "builtin:tiny-llama", "data.tokens_per_batch=2048",
                         "train.grad_accum=4", "train.epochs=1", "msft.evals_per_epoch=4"))
    steps = [e["step"] for e in history["evals"]]
    assert steps == sorted(set(steps)) and len(steps) == history["totals"]["steps"] + 1


def test_attention_choice_follows_device_dtype_and_flash_attn(monkeypatch):
    import importlib.util

    from msft_fast import model as model_mod

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert model_mod.choose_attention("auto", cpu, torch.bfloat16) == "packed_sdpa"  # no varlen attention on a CPU
    assert model_mod.choose_attention("sdpa", cpu, torch.bfloat16) == "sdpa"
    real = importlib.util.find_spec
    monkeypatch.setattr(model_mod.importlib.util, "find_spec",
                        lambda name: object() if name in ("flash_attn", "triton") else real(name))
    assert model_mod.choose_attention("auto", cuda, torch.bfloat16) == "flash_attention_2"
    assert model_mod.choose_attention("auto", cuda, torch.float32) == "packed_sdpa"  # flash has no fp32
    with pytest.raises(ConfigError, match="flash_attention_2 needs CUDA, bf16"):
        model_mod.choose_attention("flash_attention_2", cuda, torch.float32)
    assert model_mod.choose_attention("eager", cuda, torch.float32) == "eager"


def test_a_head_with_both_a_bias_and_a_logit_scale_is_refused(tokenizer):
    from msft_fast.model import _check_head

    model = tiny_llama(tokenizer)
    model.lm_head = torch.nn.Linear(32, len(tokenizer), bias=True)
    _check_head(model, "m")  # a bias alone goes to the loss
    model.config.logit_scale = 0.25
    with pytest.raises(ModelError, match="both an LM-head bias and a logit scale"):
        _check_head(model, "m")


def test_a_saved_dataset_folder_is_not_written_into(tmp_path, tokenizer):
    import datasets

    from msft_fast.config import DataConfig, TaskConfig
    from msft_fast.data.tasks import load_tasks

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(20)]).save_to_disk(str(folder))
    before = sorted(os.listdir(folder))
    cfg = DataConfig(tasks=[TaskConfig("t", str(folder), val_fraction=0.2)], max_seq_len=32,
                     tokens_per_batch=64, cache_dir=str(tmp_path / "cache"))
    tasks = load_tasks(cfg, tokenizer)
    assert len(tasks[0].train) == 16 and sorted(os.listdir(folder)) == before
    assert os.listdir(tmp_path / "cache" / "msft_fast_tokenized")
