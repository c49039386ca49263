"""Row encoding: token ids and trained-token masks for each format, shifted labels, row errors."""
from __future__ import annotations

import copy

import pytest

from msft_fast.data.formats import IGNORE_INDEX, RowEncoder, RowError, detect_format, labels_from_mask

CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "six, i.e. 6"},
]


def _masked_runs(ids, mask) -> list[list[int]]:
    """Contiguous runs of masked tokens."""
    runs, cur = [], []
    for tok, m in zip(ids, mask):
        if m:
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def unmarked_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" in tokenizer.chat_template and "generation %}" not in tok.chat_template
    return tok


# ---------------------------------------------------------------------------------------------
# prompt / completion and text


def test_prompt_completion_ids_and_mask(tokenizer):
    prompt, completion = "Q: capital of France?\nA:", " Paris."
    ids, mask = RowEncoder(tokenizer, "prompt_completion").encode({"prompt": prompt, "completion": completion})
    assert len(ids) == len(mask) == 1 + len(prompt) + len(completion) + 1
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert _decode(tokenizer, ids[1 : 1 + len(prompt)]) == prompt
    assert _decode(tokenizer, ids[1 + len(prompt) : -1]) == completion
    assert mask == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)
    trained = [t for t, m in zip(ids, mask) if m]
    assert _decode(tokenizer, trained) == completion + tokenizer.eos_token


def test_prompt_completion_boundary_not_merged(tokenizer):
    # The completion is tokenized on its own, with no BOS in between.
    ids, mask = RowEncoder(tokenizer, "prompt_completion").encode({"prompt": "ab", "completion": "cd"})
    assert ids.count(tokenizer.bos_token_id) == 1
    assert _decode(tokenizer, ids) == tokenizer.bos_token + "abcd" + tokenizer.eos_token
    assert mask == [0, 0, 0, 1, 1, 1]


def test_text_all_ones_with_eos(tokenizer):
    text = "Hello, world!\nsecond line"
    ids, mask = RowEncoder(tokenizer, "text").encode({"text": text})
    assert mask == [1] * len(ids)
    assert len(ids) == len(text) + 2
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert _decode(tokenizer, ids[1:-1]) == text


def test_extra_columns_are_ignored(tokenizer):
    enc = RowEncoder(tokenizer, "text")
    assert enc.encode({"text": "abc", "id": 3, "source": "x"}) == enc.encode({"text": "abc"})


# ---------------------------------------------------------------------------------------------
# messages


def test_messages_marked_template(tokenizer):
    enc = RowEncoder(tokenizer, "messages")
    assert enc.template_marks_generation
    ids, mask = enc.encode({"messages": CHAT})
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert ids[0] == tokenizer.bos_token_id and mask[0] == 0
    runs = [_decode(tokenizer, r) for r in _masked_runs(ids, mask)]
    assistant = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert runs == [c + "<|end|>" for c in assistant]
    # the untrained part holds the system and user contents and the role headers
    untrained = _decode(tokenizer, [t for t, m in zip(ids, mask) if not m])
    for m in CHAT:
        if m["role"] != "assistant":
            assert f"<|{m['role']}|>{m['content']}<|end|>" in untrained
    assert untrained.count("<|assistant|>") == 2
    # the full rendering is unchanged by masking
    assert _decode(tokenizer, ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_messages_unmarked_template_falls_back_to_prefixes(tokenizer, unmarked_tokenizer):
    marked = RowEncoder(tokenizer, "messages")
    plain = RowEncoder(unmarked_tokenizer, "messages")
    assert marked.template_marks_generation and not plain.template_marks_generation
    for chat in (CHAT, CHAT[1:3], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]):
        ids_m, mask_m = marked.encode({"messages": chat})
        ids_p, mask_p = plain.encode({"messages": chat})
        assert ids_p == ids_m
        assert mask_p == mask_m
        assert sum(mask_p) > 0


def test_messages_unmarked_template_not_prefix_stable_is_row_error(tokenizer):
    # A template that renders the last turn differently cannot be masked by prefixes.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if loop.last %}<|end|>{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(RowError, match="prefix by prefix"):
        RowEncoder(tok, "messages").encode({"messages": CHAT})


# ---------------------------------------------------------------------------------------------
# labels


def test_labels_from_mask(tokenizer):
    ids, mask = RowEncoder(tokenizer, "messages").encode({"messages": CHAT})
    labels = labels_from_mask(ids, mask)
    assert len(labels) == len(ids)
    assert labels[-1] == IGNORE_INDEX
    for i in range(len(ids) - 1):
        assert labels[i] == (ids[i + 1] if mask[i + 1] else IGNORE_INDEX)
    assert sum(lab != IGNORE_INDEX for lab in labels) == sum(mask[1:])


def test_labels_from_mask_small_cases():
    assert labels_from_mask([10, 11, 12, 13], [0, 0, 1, 1]) == [IGNORE_INDEX, 12, 13, IGNORE_INDEX]
    assert labels_from_mask([10, 11, 12], [1, 1, 1]) == [11, 12, IGNORE_INDEX]
    assert labels_from_mask([10, 11, 12], [1, 0, 0]) == [IGNORE_INDEX] * 3
    assert labels_from_mask([7], [1]) == [IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "fmt, row, match",
    [
        ("prompt_completion", {"prompt": "a"}, "missing field 'completion'"),
        ("prompt_completion", {"prompt": "a", "completion": None}, "missing field 'completion'"),
        ("prompt_completion", {"prompt": "a", "completion": 3}, "field 'completion' must be a str, got int"),
        ("text", {"body": "x"}, "missing field 'text'"),
        ("text", {"text": ["a"]}, "field 'text' must be a str, got list"),
        ("messages", {"messages": "hi"}, "field 'messages' must be a list"),
        ("messages", {"messages": []}, "'messages' is empty"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        (
            "messages",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
            "message 1 has unknown role 'bot'",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
            "message 1 must be an object",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
            "message 1 must be an object",
        ),
        ("messages", {"messages": ["hello", {"role": "assistant", "content": "x"}]}, "message 0 must be an object"),
        (
            "messages",
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            "roles out of order: message 0 is 'assistant' as the first message",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                          {"role": "assistant", "content": "a"}]},
            "message 1 is 'system' after a 'user' turn; 'system' may come only as the first message",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                          {"role": "assistant", "content": "b"}]},
            "message 2 is 'assistant' after a 'assistant' turn",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                          {"role": "assistant", "content": "a"}]},
            "message 1 is 'user' after a 'user' turn",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "{}"},
                          {"role": "assistant", "content": "a"}]},
            "message 1 is 'tool' after a 'user' turn",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                          {"role": "user", "content": "q2"}]},
            "the last message is 'user'",
        ),
    ],
)
def test_row_errors(tokenizer, fmt, row, match):
    with pytest.raises(RowError, match=match):
        RowEncoder(tokenizer, fmt).encode(row)


def test_tool_turns_in_order_are_accepted(tokenizer):
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "call"}, {"role": "tool", "content": "42"},
            {"role": "tool", "content": "43"}, {"role": "assistant", "content": "a"}]
    ids, mask = RowEncoder(tokenizer, "messages").encode({"messages": chat})
    assert sum(mask) == len("call") + len("a") + 2  # both assistant turns with their <|end|>


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["messages"], "messages"),
        (["messages", "text", "id"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["completion", "prompt", "text"], "prompt_completion"),
        (["text"], "text"),
        (["text", "prompt"], "text"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


@pytest.mark.parametrize("columns", [["question", "answer"], ["prompt"], [], ["completion", "id"]])
def test_detect_format_unknown_columns(columns):
    with pytest.raises(RowError, match="cannot tell the format") as info:
        detect_format(columns)
    assert str(sorted(columns)) in str(info.value)


def test_tokenizer_without_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(RowError, match="no chat template"):
        RowEncoder(tok, "messages")
    # the other formats do not need a template
    ids, mask = RowEncoder(tok, "text").encode({"text": "ok"})
    assert len(ids) == 4 and mask == [1] * 4


def test_unknown_format(tokenizer):
    with pytest.raises(ValueError, match="unknown format"):
        RowEncoder(tokenizer, "chatml")
