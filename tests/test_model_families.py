"""The families users fine-tune (Qwen2.5, Qwen3, Llama 3, Gemma 2, OLMo 2) work with default settings.

Each family is a tiny random-init model with its own locally trained tokenizer and a family-style
chat template without {% generation %} marks (tests/families.py). Checked per family: the trained
labels equal an independent, hand-written masking of the assistant turns; `auto` attention picks a
backend the model supports; a short mSFT run trains, records its backends in history.json, exports
final/, and plain HF reproduces the recorded validation losses from final/ alone.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from families import FAMILIES, QWEN3_GENERATION_TEMPLATE, build_family, expected_trained_text

from msft_fast import model as model_mod
from msft_fast.config import DataConfig, TaskConfig, load_config
from msft_fast.data.formats import IGNORE_INDEX
from msft_fast.errors import ConfigError
from msft_fast.model import AttentionBackend, choose_attention

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> (model folder, {task: (train.jsonl, val.jsonl)}), built once per module."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            made[family] = (root / "model", build_family(family, root / "model", root / "data"))
        return made[family]

    return get


def _data_config(tasks: dict, cache, **extra) -> DataConfig:
    return DataConfig(tasks=[TaskConfig(name, train, val) for name, (train, val) in tasks.items()],
                      max_seq_len=128, tokens_per_batch=512, cache_dir=str(cache), **extra)


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _trained_runs(tokenizer, docs, d: int) -> list[str]:
    """The label runs of document d, decoded: the text each stretch of trained tokens must produce."""
    a, n = int(docs.starts[d]), int(docs.lengths[d])
    runs, cur = [], []
    for lab in docs.labels[a: a + n].tolist() + [IGNORE_INDEX]:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            runs.append(tokenizer.decode(cur, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            cur = []
    return runs


@pytest.mark.stack
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_labels_are_exactly_the_assistant_turns(family, family_dirs, tmp_path):
    from transformers import AutoTokenizer

    from msft_fast.data.tasks import load_tasks

    folder, files = family_dirs(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for task in load_tasks(_data_config(files, tmp_path / "cache"), tokenizer):
        for split, docs, path in (("train", task.train, files[task.name][0]), ("val", task.val, files[task.name][1])):
            rows = _rows(path)
            assert len(docs) == len(rows)
            for d, row in enumerate(rows):
                expected = expected_trained_text(family, row["messages"])
                assert _trained_runs(tokenizer, docs, d) == expected, f"{family} {task.name} {split} row {d + 1}"
                # The packed document is the template's own rendering, token for token.
                a, n = int(docs.starts[d]), int(docs.lengths[d])
                rendered = tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
                assert docs.input_ids[a: a + n].tolist() == list(rendered)


@pytest.mark.stack
def test_qwen3_empty_think_block_policies(family_dirs, tmp_path):
    """Qwen3's template gives the last answer an empty think block: trained by default, kept as
    prompt, or cut out of the text."""
    from transformers import AutoTokenizer

    from msft_fast.data.tasks import load_tasks

    folder, files = family_dirs("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = _rows(files["arith"][0])
    for policy in ("prompt", "strip"):
        task = load_tasks(_data_config(files, tmp_path / policy, empty_think_blocks=policy), tokenizer)[0]
        for d, row in enumerate(rows):
            assert _trained_runs(tokenizer, task.train, d) == expected_trained_text("qwen3", row["messages"], policy)
            a, n = int(task.train.starts[d]), int(task.train.lengths[d])
            text = tokenizer.decode(task.train.input_ids[a: a + n].tolist(), skip_special_tokens=False)
            assert text.count("<think>") == (1 if policy == "prompt" else 0)
            if policy == "prompt":  # Qwen3's non-thinking mode: the empty block ends the prompt
                prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True,
                                                       enable_thinking=False)
                assert text.startswith(prompt) and prompt.endswith("<think>\n\n</think>\n\n")


# ---------------------------------------------------------------------------------------------
# Attention


SDPA_REFUSED_FOR_GEMMA2 = re.compile(r"sdpa (is not supported by Gemma2ForCausalLM \(HF marks it so\)|has no "
                                     r"attention logit soft-capping, which Gemma2ForCausalLM uses)")


def test_auto_attention_asks_the_model_class_what_it_supports(monkeypatch):
    from transformers import Gemma2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM

    # On a CPU: SDPA over length buckets where HF marks the model as supporting SDPA, else eager
    # (Gemma 2: no soft-capping in SDPA).
    assert choose_attention("auto", CPU, torch.float32, Gemma2ForCausalLM) == "eager"
    assert choose_attention("auto", CPU, torch.float32, Qwen3ForCausalLM) == model_mod.PACKED_SDPA
    assert choose_attention("eager", CPU, torch.float32, Gemma2ForCausalLM) == "eager"
    with pytest.raises(ConfigError) as e:
        choose_attention("sdpa", CPU, torch.float32, Gemma2ForCausalLM)
    # Recent transformers mark Gemma 2 as without SDPA; 5.0 does not, and its soft-capping refuses it.
    why = SDPA_REFUSED_FOR_GEMMA2.search(str(e.value))
    assert why is not None and str(e.value) == (f"config key 'model.attn_implementation': {why.group(0)}; values that "
                                                "work for Gemma2ForCausalLM here: auto (picks eager), eager")
    with pytest.raises(ConfigError, match="flex_attention needs CUDA.*values that work for LlamaForCausalLM here: "
                                          "auto \\(picks packed_sdpa\\), packed_sdpa, sdpa, eager$"):
        choose_attention("flex_attention", CPU, torch.float32, LlamaForCausalLM)

    # On CUDA with Triton (and no flash-attn): FlexAttention for both; a model without Flex support gets SDPA.
    real = model_mod.importlib.util.find_spec
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda n: object() if n == "triton" else
                        (None if n == "flash_attn" else real(n)))
    assert choose_attention("auto", CUDA, torch.bfloat16, Gemma2ForCausalLM) == model_mod.FLEX_ATTENTION

    class NoFlex(LlamaForCausalLM):
        _supports_flex_attn = False

    assert choose_attention("auto", CUDA, torch.bfloat16, NoFlex) == model_mod.PACKED_SDPA
    with pytest.raises(ConfigError, match="flex_attention is not supported by NoFlex"):
        choose_attention("flex_attention", CUDA, torch.bfloat16, NoFlex)


def test_a_new_backend_is_one_more_candidate(monkeypatch):
    """`auto` takes the first usable candidate: a backend inserted before SDPA with its own test of
    where it applies is picked there, and only there."""
    from transformers import Gemma2ForCausalLM, LlamaForCausalLM

    buckets = AttentionBackend("sdpa_buckets", "sdpa_buckets",
                               lambda s: None if s.device.type == "cpu" and not s.model_lacks("_supports_sdpa")
                               and not s.softcapped() else "sdpa_buckets needs a CPU and SDPA")
    backends = list(model_mod.ATTENTION_BACKENDS)
    backends.insert([b.name for b in backends].index("packed_sdpa"), buckets)
    monkeypatch.setattr(model_mod, "ATTENTION_BACKENDS", tuple(backends))
    assert choose_attention("auto", CPU, torch.float32, LlamaForCausalLM) == "sdpa_buckets"
    assert choose_attention("auto", CPU, torch.float32, Gemma2ForCausalLM) == "eager"


def test_a_gemma2_folder_loads_with_eager_attention_under_auto(family_dirs):
    from msft_fast.config import ModelConfig

    folder, _ = family_dirs("gemma2")
    spec = model_mod.load_model_spec(ModelConfig(path=str(folder)), "fp32", CPU)
    assert spec.attn_implementation == "eager"
    with pytest.raises(ConfigError, match="'model.attn_implementation': " + SDPA_REFUSED_FOR_GEMMA2.pattern):
        model_mod.load_model_spec(ModelConfig(path=str(folder), attn_implementation="sdpa"), "fp32", CPU)


# ---------------------------------------------------------------------------------------------
# One short mSFT run per family


def _plain_hf_val_losses(final_dir, data_cfg: DataConfig) -> dict[str, float]:
    """Per-task mean validation token loss computed from final/ alone with plain HF: its tokenizer
    (and chat template) tokenizes the validation rows, its model scores each document on its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msft_fast.data.tasks import load_tasks

    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).eval()
    losses = {}
    for task in load_tasks(data_cfg, tokenizer):
        docs, total, count = task.val, 0.0, 0
        for a, n in zip(docs.starts.tolist(), docs.lengths.tolist()):
            ids = torch.tensor(docs.input_ids[a: a + n], dtype=torch.long)[None]
            labels = torch.tensor(docs.labels[a: a + n], dtype=torch.long)
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0].float()
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
        losses[task.name] = total / count
    return losses


def _run_family(family, family_dirs, tmp_path, *extra):
    from msft_fast.run import train

    folder, files = family_dirs(family)
    spec = ", ".join(f"{{name: {n}, train: {tr}, val: {va}}}" for n, (tr, va) in files.items())
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "method=msft", f"model.path={folder}",
                             f"data.tasks=[{spec}]", "data.max_seq_len=128", "data.tokens_per_batch=512",
                             f"data.cache_dir={tmp_path / 'cache'}", "train.lr=3e-3", "train.epochs=2",
                             "train.progress=false", "train.checkpoint_every=0", "msft.budget_epochs=1",
                             "msft.evals_per_epoch=2", "msft.max_stages=2", *extra])
    return cfg, train(cfg)


def _check_final_reproduces_history(cfg, history, final_dir):
    final = history["evals"][history["final"]["eval_id"]]
    assert final["steps_trained"] > 0  # the final model is a trained one, not the start
    recorded = {name: t["val_loss"] for name, t in final["tasks"].items()}
    assert all(math.isfinite(v) for v in recorded.values())
    reloaded = _plain_hf_val_losses(final_dir, cfg.data)
    assert reloaded == pytest.approx(recorded, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_exports_and_reloads_with_plain_hf(family, family_dirs, tmp_path):
    from transformers import AutoTokenizer

    cfg, history = _run_family(family, family_dirs, tmp_path)
    assert history["status"] == "finished" and history["totals"]["steps"] > 0
    assert history["attn_implementation"] == ("eager" if family == "gemma2" else model_mod.PACKED_SDPA)
    assert history["compute_dtype"] == "float32" and history["loss_implementation"] == "torch"
    final_dir = tmp_path / "run" / "final"
    assert AutoTokenizer.from_pretrained(final_dir).chat_template == FAMILIES[family][4]
    _check_final_reproduces_history(cfg, history, final_dir)


@pytest.mark.stack
@pytest.mark.slow
def test_a_chat_template_override_trains_and_is_exported(family_dirs, tmp_path):
    """data.chat_template (a file, here Qwen3's template with {% generation %} marks, which leaves the
    newline after <|im_end|> untrained) replaces the model folder's template for the data, the
    evaluation and final/; with empty_think_blocks=prompt the empty think block is not trained."""
    from transformers import AutoTokenizer

    assert QWEN3_GENERATION_TEMPLATE.count("generation %}") == 2
    template_file = tmp_path / "qwen3_train.jinja"
    template_file.write_text(QWEN3_GENERATION_TEMPLATE, encoding="utf-8")
    cfg, history = _run_family("qwen3", family_dirs, tmp_path, f"data.chat_template={template_file}",
                               "data.empty_think_blocks=prompt")
    final_dir = tmp_path / "run" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    assert tokenizer.chat_template == QWEN3_GENERATION_TEMPLATE
    _check_final_reproduces_history(cfg, history, final_dir)
    # What was trained: each answer and its <|im_end|>, no think block, no newline after it.
    from msft_fast.data.tasks import load_tasks

    _, files = family_dirs("qwen3")
    task = load_tasks(cfg.data, tokenizer)[0]
    for d, row in enumerate(_rows(files["arith"][0])):
        expected = [t.removesuffix("\n") for t in expected_trained_text("qwen3", row["messages"], "prompt")]
        assert _trained_runs(tokenizer, task.train, d) == expected
