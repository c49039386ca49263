"""Turn one row (chat, prompt/completion or plain text) into token ids and a trained-token mask.

The mask marks tokens the model must learn to produce: assistant turns, a completion plus EOS,
or all of a text. `labels_from_mask` turns it into shifted labels for the packed batch.
"""
from __future__ import annotations

import re
from typing import Any, Optional

IGNORE_INDEX = -100
FORMATS = ("messages", "prompt_completion", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")
_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RowError(ValueError):
    """A row does not have the shape its format needs; the caller adds file and row number."""


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
    """Encodes rows of one format with one tokenizer: `encode(row) -> (input_ids, mask)`."""

    def __init__(self, tokenizer: Any, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.eos_id: Optional[int] = tokenizer.eos_token_id
        template = getattr(tokenizer, "chat_template", None)
        if fmt == "messages" and not template:
            raise RowError("the tokenizer has no chat template, so it cannot render 'messages' rows")
        self.template_marks_generation = bool(template) and bool(_GENERATION_MARK.search(template))

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
        if self.template_marks_generation:
            out = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
        return self._encode_messages_by_prefixes(messages)

    def _encode_messages_by_prefixes(self, messages: list) -> tuple[list[int], list[int]]:
        """Without generation marks, an assistant turn is what rendering it adds to the prefix."""
        render = self.tokenizer.apply_chat_template
        ids = list(render(messages, tokenize=True, return_dict=True)["input_ids"])
        mask = [0] * len(ids)
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            start = len(render(messages[:i], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"])
            upto = list(render(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"])
            if ids[: len(upto)] != upto or start > len(upto):
                raise RowError(
                    "the chat template does not render conversations prefix by prefix, so assistant "
                    "tokens cannot be found; use a template with {% generation %} marks"
                )
            mask[start : len(upto)] = [1] * (len(upto) - start)
        return ids, mask


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
