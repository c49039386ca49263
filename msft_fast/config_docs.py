"""The config reference (docs/config.md), generated from the schema in msft_fast/config.py: every key
with its type or choices, its default, and the comment written beside the field as its description,
so that the reference cannot drift from the code.

    python -m msft_fast.config_docs                            # print the generated reference
    python -m msft_fast.config_docs --write docs/config.md     # replace it between the file's markers
    python -m msft_fast.config_docs --check docs/config.md     # exit 1 when the file is out of date

A field's description is its trailing `# comment` in config.py, else the comment lines right above
it. The few fields that have neither take theirs from UNCOMMENTED below (a test fails once such a
field gets a comment of its own, so there is never a second description to keep in step).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from msft_fast import config as schema

BEGIN = "<!-- BEGIN GENERATED: python -m msft_fast.config_docs --write docs/config.md (do not edit by hand) -->"
END = "<!-- END GENERATED -->"

# Descriptions of the fields that config.py leaves without a comment.
UNCOMMENTED = {
    "output_dir": "run folder; a finished run there is kept unless `--overwrite`, an unfinished one resumes",
    "method": "the training method (see docs/methods.md)",
    "model.attn_implementation": "packed attention backend; auto: flash_attention_2 on CUDA when flash-attn is "
                                 "installed and compute is 16-bit, else packed_sdpa, else the next backend the model "
                                 "supports (docs/data.md, Packing); flex_attention runs on CUDA only",
    "data.tasks": "the sub-datasets of the mixture, one entry per task (keys `data.tasks[i].*` below)",
    "data.tasks[i].name": "the task's name (unique; it names the task in logs, history.json and reports)",
    "data.tasks[i].val_fraction": "hold out this share of the train rows for validation, in (0, 1)",
    "data.tasks[i].format": "row format; auto: detected from the columns",
    "data.tasks[i].val_revision": "branch, tag or commit of `val` when it is a Hub dataset of its own",
    "data.overlong": "what happens to rows longer than max_seq_len (counted in history.json either way)",
    "train.lr": "peak learning rate (AdamW)",
    "train.epochs": "epochs of the mixture (fractions allowed); the lr schedule spans them for every method",
    "train.seed": "data order (and the built-in model's initialisation)",
    "train.grad_accum": "micro-batches per rank per optimizer step",
    "train.warmup_steps": "linear warm-up steps",
    "train.schedule": "lr after warm-up",
    "train.weight_decay": "AdamW decay on matrices (not on norms or biases)",
    "train.beta1": "AdamW beta1",
    "train.beta2": "AdamW beta2",
    "train.log_every": "write every n-th optimizer step to metrics.jsonl",
}


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, as overrides and error messages write it: train.lr, data.tasks[i].train
    owner: str  # the dataclass that declares the field (TrainConfig, ...)
    type: str
    default: str
    description: str


def key_docs() -> list[KeyDoc]:
    """Every config key, in the order of the schema."""
    comments = field_comments()
    docs: list[KeyDoc] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, key = hints[f.name], prefix + f.name
            if dataclasses.is_dataclass(tp):  # a section: model, data, train, ...
                walk(tp, key + ".")
                continue
            description = comments.get((cls.__name__, f.name)) or UNCOMMENTED.get(key, "")
            docs.append(KeyDoc(key, cls.__name__, type_text(tp), default_text(f), description))
            element = _list_element(tp)
            if element is not None and dataclasses.is_dataclass(element):  # data.tasks: a list of sections
                walk(element, key + "[i].")

    walk(schema.Config, "")
    return docs


def is_config_key(key: str) -> bool:
    """Whether a dotted key names a config key: `train.lr`, `data.tasks[0].train`, `data.tasks[i]`,
    `data.tasks[1].columns.prompt` (the entries of a mapping such as `columns` are the user's)."""
    node: Any = schema.Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        name, _, index = part.partition("[")
        node = _without_null(node)
        if not (dataclasses.is_dataclass(node) and isinstance(node, type)):
            return typing.get_origin(node) is dict and i == len(parts) - 1 and not index
        hints = typing.get_type_hints(node)
        if name not in hints:
            return False
        node = hints[name]
        if index:
            node = _list_element(node)
            if node is None:
                return False
    return True


def field_comments(source: Optional[str] = None) -> dict[tuple[str, str], str]:
    """(class name, field name) -> its description from the comments in `source` (config.py's)."""
    source = inspect.getsource(schema) if source is None else source
    trailing: dict[int, str] = {}  # line -> a comment after code on that line
    alone: dict[int, str] = {}  # line -> a comment that is the whole line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            line = tok.start[0]
            (alone if not tok.line[:tok.start[1]].strip() else trailing)[line] = text
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            after = [trailing[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in trailing]
            above: list[str] = []
            n = stmt.lineno - 1
            while n in alone:  # a comment block right above the field (no blank line between)
                above.insert(0, alone[n])
                n -= 1
            text = " ".join(after) if after else " ".join(above)
            if text:
                out[(node.name, stmt.target.id)] = text
    return out


def type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{type_text(inner[0])} or null"
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        element = args[0]
        if dataclasses.is_dataclass(element):
            return "list of sections"
        return "list of " + (", ".join(f"`{a}`" for a in typing.get_args(element))
                             if typing.get_origin(element) is Literal else type_text(element))
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    return {str: "string", int: "int", float: "float", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value!r}`" if isinstance(value, (list, dict)) else f"`{value}`"


def render() -> str:
    """The generated part of docs/config.md: one table per section, markers included."""
    sections: dict[str, list[KeyDoc]] = {}  # in the order the schema first reaches each
    for doc in key_docs():
        sections.setdefault(_section_of(doc.key), []).append(doc)
    lines = [BEGIN]
    for head, docs in sections.items():
        title = "top level" if head == "" else f"`{head}`"
        lines += ["", f"### {title}", "", "| key | type | default | description |", "|---|---|---|---|"]
        for doc in docs:
            cells = [f"`{doc.key}`", doc.type, doc.default, _no_html(doc.description)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", END]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between (and including) the markers replaced by `block`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the file has no generated block: it needs a line {BEGIN} and, after it, a line {END}")
    return text[:start] + block + text[end + len(END):]


def _no_html(text: str) -> str:
    """`<think>` outside a code span would be read as an HTML tag and vanish from the page."""
    pieces = text.split("`")
    return "`".join(p.replace("<", "&lt;") if i % 2 == 0 else p for i, p in enumerate(pieces))


def _section_of(key: str) -> str:
    """`train.lr` -> train, `data.tasks[i].name` -> data.tasks[i], `data.tasks` -> data, `method` -> ''."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def _list_element(tp: Any) -> Optional[Any]:
    """X for list[X] (also inside Optional), else None."""
    tp = _without_null(tp)
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _without_null(tp: Any) -> Any:
    """X for Optional[X]; anything else as it is."""
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msft_fast.config_docs", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", metavar="FILE", help="replace the generated block of FILE")
    what.add_argument("--check", metavar="FILE", help="exit 1 when FILE's generated block is out of date")
    args = parser.parse_args(argv)
    block = render()
    if not (args.write or args.check):
        print(block)
        return 0
    path = args.write or args.check
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        new = replace_block(text, block)
    except ValueError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path} is out of date: run python -m msft_fast.config_docs --write {path}", file=sys.stderr)
            return 1
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
