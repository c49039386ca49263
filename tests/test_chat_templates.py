"""Chat templates: whatever a template raises is one line naming the task, file and row (exit 2,
nothing written); `data.chat_template` replaces the tokenizer's template; empty think blocks are
trained, kept as prompt, or stripped; assistant spans survive reasoning templates.
"""
from __future__ import annotations

import copy
import shutil

import pytest
from conftest import write_jsonl
from test_bad_input import _assert_not_finished, _error_line, _write_config

from msft_fast.cli import main
from msft_fast.config import DataConfig, TaskConfig
from msft_fast.data.chat_template import ChatRenderer, read_chat_template
from msft_fast.data.formats import RowEncoder, RowError, tokens_in_spans
from msft_fast.errors import ConfigError, DataError

# Renders like the built-in template (no generation marks); each failing variant below breaks on
# the conversation with 3 messages only, which is row 2 of the file.
BODY = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROWS = [
    {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"},
                  {"role": "assistant", "content": "a2"}]},
    {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]},
]
ON_ROW_2 = "{% if messages|length > 2 %}"

# kind: (template, what the one line must say after "task 'chat': train file F: ")
TEMPLATE_FAILURES = {
    "raise_exception": ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}" + BODY,
                        "row 2: the chat template refused the conversation (template line 1): System role not "
                        "supported"),
    "undefined_value": (ON_ROW_2 + "{{ messages[0].meta.lang }}{% endif %}" + BODY,
                        "row 2: the chat template uses an undefined value (template line 1): 'dict object' has no "
                        "attribute 'meta'"),
    "python_error": (BODY + "\n" + ON_ROW_2 + "{{ messages[0]['content'] + 1 }}{% endif %}",
                     "row 2: the chat template failed (template line 2): TypeError: can only concatenate str"),
    "renders_nothing": ("{% if messages|length < 3 %}" + BODY + "{% endif %}",
                        "row 2: the chat template rendered nothing for this conversation"),
    "not_prefix_by_prefix": (BODY.replace("<|end|>{% endfor %}", "<|end|>{% if loop.last %}!{% endif %}{% endfor %}"),
                             "row 1: the chat template does not render conversations prefix by prefix (message 1, "
                             "the assistant's, renders differently"),
}


def _chat_config(tmp_path, template=None, model="builtin:tiny-llama") -> dict:
    train = write_jsonl(tmp_path / "data" / "chat.jsonl", ROWS)
    val = write_jsonl(tmp_path / "data" / "chat_val.jsonl", ROWS[:1])
    data = {"tasks": [{"name": "chat", "train": train, "val": val}], "max_seq_len": 64, "tokens_per_batch": 256,
            "cache_dir": str(tmp_path / "cache")}
    if template is not None:
        data["chat_template"] = template
    return {"output_dir": str(tmp_path / "run"), "model": {"path": model}, "data": data,
            "train": {"progress": False, "epochs": 1}}


@pytest.mark.parametrize("kind", list(TEMPLATE_FAILURES))
def test_a_failing_chat_template_is_one_line_naming_task_file_and_row(kind, tmp_path, capsys):
    template, says = TEMPLATE_FAILURES[kind]
    cfg = _chat_config(tmp_path, template)
    code = main(["train", "--config", _write_config(tmp_path, cfg)])
    line = _error_line(code, capsys.readouterr().err)
    assert line.startswith(f"msft-fast: error: task 'chat': train file {tmp_path}/data/chat.jsonl: {says}"), line
    _assert_not_finished(cfg["output_dir"])
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_model_folder_template_that_is_not_jinja_names_task_file_and_line(tmp_path, user_model_dir, capsys):
    folder = tmp_path / "model"
    shutil.copytree(user_model_dir, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m['content'] }}\n")
    cfg = _chat_config(tmp_path, model=str(folder))
    line = _error_line(main(["train", "--config", _write_config(tmp_path, cfg)]), capsys.readouterr().err)
    assert line.startswith(f"msft-fast: error: task 'chat': train file {tmp_path}/data/chat.jsonl: the chat template "
                           "is not a valid Jinja template: line 2: Unexpected end of template"), line
    _assert_not_finished(cfg["output_dir"])


@pytest.mark.parametrize("inline", [True, False])
def test_a_chat_template_override_that_is_not_jinja_names_the_key(inline, tmp_path, capsys):
    text = "{% if messages %}{{ messages[0]['content'] }\n"
    if not inline:
        (tmp_path / "t.jinja").write_text(text)
    cfg = _chat_config(tmp_path, text if inline else str(tmp_path / "t.jinja"))
    line = _error_line(main(["train", "--config", _write_config(tmp_path, cfg)]), capsys.readouterr().err)
    where = "inline" if inline else str(tmp_path / "t.jinja")
    assert line.startswith(f"msft-fast: error: config key 'data.chat_template' ({where}) is not a valid Jinja "
                           "template: line 1: unexpected '}'"), line


@pytest.mark.parametrize("marked", [False, True])
def test_a_template_that_gives_no_text_is_a_row_error(marked, tmp_path, tokenizer):
    """HF's apply_chat_template returns text (or ids and a mask); a tokenizer class that returns
    something else fails on the first row, named."""
    from msft_fast.data.tasks import load_tasks

    tok = copy.deepcopy(tokenizer)
    if not marked:
        tok.chat_template = BODY
    tok.apply_chat_template = lambda *args, **kwargs: [1, 2, 3]
    train = write_jsonl(tmp_path / "chat.jsonl", ROWS)
    cfg = DataConfig(tasks=[TaskConfig("chat", train, train)], max_seq_len=64, tokens_per_batch=256,
                     cache_dir=str(tmp_path / "cache"))
    gave = "not token ids and an assistant mask" if marked else "not text"
    with pytest.raises(DataError, match=f"^task 'chat': train file {train}: row 1: the chat template gave a list, {gave}$"):
        load_tasks(cfg, tok)


def test_read_chat_template_takes_a_file_or_inline_text(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert read_chat_template(str(tmp_path / "t.jinja")) == "{{ messages }}"
    assert read_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}").startswith("{% for")
    with pytest.raises(ConfigError, match=f"'data.chat_template': {tmp_path}/missing.jinja is not a file"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_the_override_replaces_the_tokenizer_template_for_data_and_export(tmp_path):
    """load_model_spec applies data.chat_template to the one tokenizer that tokenizes the data and is
    saved into final/."""
    import torch

    from msft_fast.config import ModelConfig
    from msft_fast.model import load_model_spec

    override = BODY.replace("<|end|>", "<|end|>\n")
    spec = load_model_spec(ModelConfig(), "fp32", torch.device("cpu"), chat_template=override)
    assert spec.tokenizer.chat_template == override
    enc = RowEncoder(spec.tokenizer, "messages")
    ids, mask = enc.encode(ROWS[0])
    assert spec.tokenizer.decode(ids) == "<s><|user|>q1<|end|>\n<|assistant|>a1<|end|>\n"
    spec.tokenizer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == override


# ---------------------------------------------------------------------------------------------
# Empty think blocks


THINK = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>"
         "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|end|>"
         "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
THINK_MARKED = THINK.replace("<|assistant|>{% if loop.last %}", "<|assistant|>{% generation %}{% if loop.last %}") \
    .replace("{{ m['content'] }}<|end|>{% else %}", "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}")
TWO_TURNS = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]


def _trained(tok, ids, mask) -> list[str]:
    runs, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


@pytest.mark.parametrize("template", [THINK, THINK_MARKED], ids=["prefixes", "generation_marks"])
@pytest.mark.parametrize("policy, text, trained", [
    ("train", "<|assistant|>a1<|end|><|user|>q2<|end|><|assistant|><think>\n\n</think>\n\na2<|end|>",
     ["a1<|end|>", "<think>\n\n</think>\n\na2<|end|>"]),
    ("prompt", "<|assistant|>a1<|end|><|user|>q2<|end|><|assistant|><think>\n\n</think>\n\na2<|end|>",
     ["a1<|end|>", "a2<|end|>"]),
    ("strip", "<|assistant|>a1<|end|><|user|>q2<|end|><|assistant|>a2<|end|>", ["a1<|end|>", "a2<|end|>"]),
])
def test_empty_think_blocks_are_trained_kept_as_prompt_or_stripped(template, policy, text, trained, tokenizer):
    """The think block only in the last turn makes the template render the first answer differently
    once a later turn follows: prefixes are compared without think blocks."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    enc = RowEncoder(tok, "messages", empty_think_blocks=policy)
    assert enc.template_marks_generation == (template is THINK_MARKED)
    ids, mask = enc.encode({"messages": TWO_TURNS})
    assert tok.decode(ids) == "<s><|user|>q1<|end|>" + text
    assert _trained(tok, ids, mask) == trained


def test_a_think_block_with_reasoning_stays_trained_under_every_policy(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = THINK.replace("<think>\n\n</think>", "<think>\nhmm\n</think>")
    for policy in ("train", "prompt", "strip"):
        ids, mask = RowEncoder(tok, "messages", empty_think_blocks=policy).encode({"messages": TWO_TURNS})
        assert _trained(tok, ids, mask) == ["a1<|end|>", "<think>\nhmm\n</think>\n\na2<|end|>"]


def test_masks_without_character_offsets_match_the_offset_masks(tokenizer):
    """Tokenizers that give no offsets (not "fast") mask by tokenizing up to each span boundary."""
    text, spans = ChatRenderer(tokenizer).assistant_spans(TWO_TURNS)

    class NoOffsets:  # the same tokenizer, as one that gives no character offsets
        is_fast = False

        def __call__(self, t, **kw):
            assert "return_offsets_mapping" not in kw
            return tokenizer(t, **kw)

    assert tokens_in_spans(NoOffsets(), text, spans) == tokens_in_spans(tokenizer, text, spans)
    # A boundary inside a token (the special token <s>, kept whole) cannot be placed without offsets.
    with pytest.raises(RowError, match="crosses the start or end of an assistant turn"):
        tokens_in_spans(NoOffsets(), "<s>ab", [(1, 5)])
