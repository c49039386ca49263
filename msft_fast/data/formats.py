"""Turn one row (chat, prompt/completion or plain text) into token ids and a trained-token mask.

The mask marks tokens the model must learn to produce: assistant turns, a completion plus EOS,
or all of a text. `labels_from_mask` turns it into shifted labels for the packed batch.
"""
from __future__ import annotations

from typing import Any, Optional

from msft_fast.data.chat_template import ChatRenderer, RowError, Span

IGNORE_INDEX = -100
FORMATS = ("messages", "prompt_completion", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")


def detect_format(columns: list[str]) -> str:
    """Pick the format from a dataset's column names."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise RowError(
        f"cannot tell the format from columns {sorted(columns)}: expected 'messages', "
        "'prompt' and 'completion', or 'text'"
    )


class RowEncoder:
    """Encodes rows of one format with one tokenizer: `encode(row) -> (input_ids, mask)`.

    empty_think_blocks (`data.empty_think_blocks`, chat rows only): `train` the empty think blocks
    of assistant turns as the template renders them, keep them as `prompt` (not trained), or
    `strip` them from the text.
    """

    def __init__(self, tokenizer: Any, fmt: str, empty_think_blocks: str = "train"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.eos_id: Optional[int] = tokenizer.eos_token_id
        self.chat = ChatRenderer(tokenizer, empty_think_blocks) if fmt == "messages" else None
        self.template_marks_generation = self.chat is not None and self.chat.marks_generation

    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        if self.fmt == "messages":
            return self._encode_messages(_field(row, "messages", list))
        if self.fmt == "prompt_completion":
            return self._encode_prompt_completion(_field(row, "prompt", str), _field(row, "completion", str))
        return self._encode_text(_field(row, "text", str))

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids + [self.eos_id] if self.eos_id is not None else ids

    def _encode_text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self._with_eos(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids, [1] * len(ids)

    def _encode_prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        # Tokenized apart so the prompt/completion boundary never merges into one token.
        p = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c = self._with_eos(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        return p + c, [0] * len(p) + [1] * len(c)

    def _encode_messages(self, messages: list) -> tuple[list[int], list[int]]:
        _check_messages(messages)
        chat = self.chat
        if chat.marks_generation and chat.empty_think_blocks == "train":
            return chat.marked_ids_and_mask(messages)  # HF's own mask, unchanged
        if chat.marks_generation:
            text = chat.render(messages)
            ids, mask = chat.marked_ids_and_mask(messages)
            spans = _token_spans(self.tokenizer, text, ids, mask)
        else:
            text, spans = chat.assistant_spans(messages)
        text, spans = chat.apply_empty_think_policy(text, spans)
        return tokens_in_spans(self.tokenizer, text, spans)


def tokens_in_spans(tokenizer: Any, text: str, spans: list[Span]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat `text` (tokenized as HF's apply_chat_template does) and a mask
    of the tokens that overlap a character span, the rule HF applies to {% generation %} marks.

    Tokenizers without character offsets (not "fast") tokenize the text up to each span boundary
    instead, which needs the boundary to fall between tokens.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        mask = [int(any(b > s and a < e for s, e in spans)) for a, b in offsets]
        return ids, mask
    encode = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    ids = encode(text)
    mask = [0] * len(ids)
    for s, e in spans:
        head, upto = encode(text[:s]), encode(text[:e])
        if ids[: len(upto)] != upto or upto[: len(head)] != head:
            raise RowError("a token of the tokenizer crosses the start or end of an assistant turn, and this "
                           "tokenizer gives no character offsets to tell which side it belongs to")
        mask[len(head): len(upto)] = [1] * (len(upto) - len(head))
    return ids, mask


def _token_spans(tokenizer: Any, text: str, ids: list[int], mask: list[int]) -> list[Span]:
    """The character spans of the masked tokens of `text` (merged where they touch)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise RowError("the chat template's token ids differ from those of its rendered text")
    spans: list[Span] = []
    for (a, b), m in zip(enc["offset_mapping"], mask):
        if not m:
            continue
        if spans and a <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
        else:
            spans.append((a, b))
    return spans


def labels_from_mask(input_ids: list[int], mask: list[int]) -> list[int]:
    """Shifted labels: labels[i] is the target of position i, i.e. input_ids[i+1] where trained.

    The last position of a document gets IGNORE_INDEX, so in a packed row no document ever
    predicts the first token of the next one.
    """
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(input_ids[1:], mask[1:])]
    labels.append(IGNORE_INDEX)
    return labels


def _field(row: dict, name: str, kind: type) -> Any:
    value = row.get(name)
    if value is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(value, kind):
        raise RowError(f"field '{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _check_messages(messages: list) -> None:
    if not messages:
        raise RowError("'messages' is empty")
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise RowError(f"message {j} must be an object with string 'role' and 'content'")
        if msg["role"] not in CHAT_ROLES:
            raise RowError(f"message {j} has unknown role {msg['role']!r} (expected one of {', '.join(CHAT_ROLES)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("'messages' has no assistant turn to train on")
    # The order most chat templates assume (several raise on anything else): an optional system
    # turn first, then user and assistant alternating, tool results only after an assistant turn,
    # and an assistant turn at the end (a trailing question without its answer is a broken row).
    for j, msg in enumerate(messages):
        role, prev = msg["role"], messages[j - 1]["role"] if j else None
        if role == "system":
            ok, want = j == 0, "only as the first message"
        elif role == "user":
            ok, want = prev in (None, "system", "assistant", "tool"), "first, or after a system, assistant or tool turn"
        elif role == "assistant":
            ok, want = prev in ("user", "tool"), "after a user or tool turn"
        else:  # tool
            ok, want = prev in ("assistant", "tool"), "after an assistant or tool turn"
        if not ok:
            after = f"after a {prev!r} turn" if prev else "as the first message"
            raise RowError(f"roles out of order: message {j} is {role!r} {after}; {role!r} may come {want}")
    if messages[-1]["role"] != "assistant":
        raise RowError(f"the last message is {messages[-1]['role']!r}: the conversation must end with the "
                       "assistant turn that answers it")
