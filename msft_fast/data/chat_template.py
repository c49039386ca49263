"""Chat templates: the `data.chat_template` override, rendering with one-sentence errors, and the
character spans of the assistant turns in a rendered conversation.

Spans come from the template's `{% generation %}` marks when it has them; otherwise from rendering
each conversation prefix (an assistant turn is what rendering it adds). Reasoning templates such as
Qwen3's render the last assistant turn with a `<think>` block that earlier turns lack, so prefixes
are compared with their think blocks left out. `data.empty_think_blocks` then says what happens
to empty think blocks (`<think>\\n\\n</think>\\n\\n`) inside the trained turns.
"""
from __future__ import annotations

import os
import re
import traceback
from typing import Any, Optional

from msft_fast.config import resolve_path
from msft_fast.errors import ConfigError

GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
EMPTY_THINK_POLICIES = ("train", "prompt", "strip")
_ANY_THINK = re.compile(r"<think>.*?</think>\s*", re.S)
_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
_PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

Span = tuple[int, int]  # [start, end) in characters of the rendered text


class RowError(ValueError):
    """A row cannot be encoded (its shape, or what the chat template does with it); the caller
    adds the task, file and row number."""


# ---------------------------------------------------------------------------------------------
# data.chat_template


def read_chat_template(value: str) -> str:
    """The template text of `data.chat_template`: a Jinja file, or the template itself inline
    (recognised by its `{{` or `{%`)."""
    if "{{" in value or "{%" in value:
        return value
    path = resolve_path(value)
    if not os.path.isfile(path):
        raise ConfigError(f"config key 'data.chat_template': {path} is not a file (give a Jinja file, or the "
                          "template itself inline)")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config key 'data.chat_template': {path} cannot be read ({_one_line(e)})") from None


def override_chat_template(tokenizer: Any, value: Optional[str]) -> None:
    """Replace the tokenizer's chat template by `data.chat_template` (None: keep its own). The
    tokenizer is the one the data, the evaluation and the exported final/ use, so all three render
    conversations the same way."""
    if value is None:
        return
    template = read_chat_template(value)
    where = "inline" if template is value else resolve_path(value)
    error = syntax_error(tokenizer, template)
    if error:
        raise ConfigError(f"config key 'data.chat_template' ({where}) is not a valid Jinja template: {error}")
    tokenizer.chat_template = template


def syntax_error(tokenizer: Any, template: str) -> Optional[str]:
    """Why `template` does not compile ("line 3: unexpected '}'"), or None. Compiling is HF's (it
    adds the `generation` tag and its globals); other failures of the probe render do not count."""
    import jinja2

    try:
        tokenizer.apply_chat_template(_PROBE, chat_template=template, tokenize=False)
    except jinja2.TemplateSyntaxError as e:
        return f"line {e.lineno}: {e.message}"
    except Exception:  # noqa: BLE001 - the template compiled; rows report their own failures
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Rendering and assistant spans


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template and finds the assistant turns.

    Any exception the template raises becomes a RowError carrying the template's own
    message and line, so the caller can name the task, file and row in one sentence.
    """

    def __init__(self, tokenizer: Any, empty_think_blocks: str = "train"):
        if empty_think_blocks not in EMPTY_THINK_POLICIES:
            raise ValueError(f"unknown empty_think_blocks {empty_think_blocks!r}")
        self.tokenizer = tokenizer
        self.empty_think_blocks = empty_think_blocks
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise RowError("the tokenizer has no chat template, so it cannot render 'messages' rows")
        if not isinstance(template, str):  # a dict of named templates: HF picks 'default'
            template = tokenizer.get_chat_template()
        error = syntax_error(tokenizer, template)
        if error:
            raise RowError(f"the chat template is not a valid Jinja template: {error}")
        self.marks_generation = bool(GENERATION_MARK.search(template))

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        text = self._call(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        if not isinstance(text, str):
            raise RowError(f"the chat template gave a {type(text).__name__}, not text")
        return text

    def _call(self, messages: list[dict], **kwargs) -> Any:
        try:
            return self.tokenizer.apply_chat_template(messages, **kwargs)
        except Exception as e:  # noqa: BLE001 - a template can raise anything; it is the row's error
            raise RowError(_template_failure(e)) from None

    def marked_ids_and_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids and HF's assistant mask, from the template's {% generation %} marks."""
        out = self._call(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        if not (hasattr(out, "keys") and "input_ids" in out and "assistant_masks" in out):
            raise RowError(f"the chat template gave a {type(out).__name__}, not token ids and an assistant mask")
        return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[Span]]:
        """The rendered conversation and the character span of each assistant turn in it, found by
        rendering the prefixes (their think blocks left out for the comparison: reasoning templates
        add one to whichever assistant turn is last). A think block at the start of a turn is part
        of the turn."""
        text = self.render(messages)
        if not text:
            raise RowError("the chat template rendered nothing for this conversation")
        full, where = _without_think(text)
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = _without_think(self.render(messages[:i], add_generation_prompt=True))[0]
            upto = _without_think(self.render(messages[: i + 1]))[0]
            if not (full.startswith(upto) and upto.startswith(before)):
                raise RowError(
                    f"the chat template does not render conversations prefix by prefix (message {i}, the "
                    "assistant's, renders differently once later messages follow), so assistant tokens cannot "
                    "be found; set data.chat_template to a template with {% generation %} marks")
            spans.append((where(len(before)), where(len(upto))))
        return text, spans

    def apply_empty_think_policy(self, text: str, spans: list[Span]) -> tuple[str, list[Span]]:
        """`train`: as rendered; `prompt`: empty think blocks stay in the text but leave the spans;
        `strip`: they are cut out of the text."""
        blocks = [m.span() for m in _EMPTY_THINK.finditer(text)]
        if not blocks or self.empty_think_blocks == "train":
            return text, spans
        if self.empty_think_blocks == "prompt":
            return text, _subtract(spans, blocks)
        kept = "".join(text[a:b] for a, b in _complement(blocks, len(text)))

        def moved(p: int) -> int:  # a position inside a cut block moves to where the block was
            return p - sum(min(p, b) - a for a, b in blocks if a < p)

        return kept, [(moved(a), moved(b)) for a, b in spans if moved(b) > moved(a)]


def _without_think(text: str):
    """`text` without its think blocks, and a map from positions there to positions in `text`
    (a position just after a cut block maps to the block's start, so the block stays with what
    follows it)."""
    if "<think>" not in text:
        return text, lambda p: p
    kept_at = []  # position in `text` of each kept character
    for a, b in _complement([m.span() for m in _ANY_THINK.finditer(text)], len(text)):
        kept_at.extend(range(a, b))
    kept = "".join(text[i] for i in kept_at)
    return kept, lambda p: kept_at[p - 1] + 1 if p > 0 else 0


def _complement(blocks: list[Span], n: int) -> list[Span]:
    """The parts of [0, n) outside the sorted, disjoint `blocks`."""
    out, at = [], 0
    for a, b in blocks:
        if a > at:
            out.append((at, a))
        at = b
    if at < n:
        out.append((at, n))
    return out


def _subtract(spans: list[Span], blocks: list[Span]) -> list[Span]:
    """`spans` minus the characters of the sorted, disjoint `blocks`."""
    out = []
    for s, e in spans:
        inside = [(max(a, s), min(b, e)) for a, b in blocks if a < e and b > s]
        out += [(max(a, s), b) for a, b in _complement(inside, e) if b > s]
    return out


def _template_failure(e: BaseException) -> str:
    """What a template's exception says, with the template line it came from when Jinja knows it."""
    import jinja2

    line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == "<template>"),
                None)
    at = f" (template line {line})" if line else ""
    if isinstance(e, jinja2.TemplateSyntaxError):
        return f"the chat template is not a valid Jinja template: line {e.lineno}: {e.message}"
    if isinstance(e, jinja2.UndefinedError):
        return f"the chat template uses an undefined value{at}: {_one_line(e)}"
    if type(e) is jinja2.TemplateError:  # raise_exception(...) in the template
        return f"the chat template refused the conversation{at}: {_one_line(e)}"
    return f"the chat template failed{at}: {type(e).__name__}: {_one_line(e)}"


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
