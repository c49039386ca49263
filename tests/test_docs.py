"""The README and docs/ say only what is true of the code: every link resolves, every config key,
`msft-fast` subcommand, `make` target and YAML config they show is real, the config reference is
what the schema generates now, and the import rules docs/architecture.md states hold."""
from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from msft_fast import config_docs
from msft_fast.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

SECTIONS = ("model", "data", "train", "msft", "ies", "dynamix")
# A dotted name starting with a config section, not part of a path or a module name (`msft_fast.train`).
_INDEX = r"(?:\[[^\]\s]*\])?"  # [0], [i]
DOTTED_KEY = re.compile(rf"(?<![\w./\-])((?:{'|'.join(SECTIONS)}){_INDEX}(?:\.[A-Za-z_]\w*{_INDEX})+)")
# File names that look like dotted keys (`train.jsonl`, `model.py`).
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "yml", "parquet", "arrow", "png", "txt", "sh", "log", "pt",
                 "pkl", "jinja", "safetensors", "whl"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _fences(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _spans(text: str) -> list[str]:
    """The inline code spans outside fenced blocks."""
    return [m.group(2).replace("\n", " ") for m in SPAN.finditer(_prose(text))]  # as rendered


def _code(text: str) -> list[str]:
    """Everything shown as code: fenced blocks and inline spans."""
    return [body for _, body in _fences(text)] + _spans(text)


def _links(text: str) -> list[str]:
    return [target for target in LINK.findall(SPAN.sub("", _prose(text)))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page."""
    anchors: set[str] = set()
    for line in _prose(_text(page)).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_fits_on_two_screens():
    assert len(_text(README).splitlines()) <= 250


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _links(_text(README)) if t.startswith("docs/")}
    pages = set(DOCS.glob("*.md"))
    assert {p.resolve() for p in pages} - linked == set()


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in _links(_text(page)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: {_rel(dest)} has no heading with that anchor")
    assert broken == []


def test_the_anchor_rule_is_githubs():
    """The slugs the link check compares against, on headings whose anchors GitHub is known to make."""
    page = DOCS / "outputs.md"
    anchors = _anchors(page)
    assert "experiment-trackers-tensorboard-and-weights--biases" in anchors
    assert "historyjson" in anchors


def _dotted_keys(page: Path) -> set[str]:
    """Config keys a page names. Not keys: one quoted in an `unknown config key '...'` message (meant
    to be wrong), and a model's parameter name (`model.layers.1.mlp...`: keys have no numeric parts)."""
    text = _text(page)
    keys = {m.group(1) for m in DOTTED_KEY.finditer(text)
            if not text[:m.start()].endswith("unknown config key '") and not re.match(r"\.\d", text[m.end():])}
    return {k for k in keys if k.rsplit(".", 1)[-1] not in FILE_SUFFIXES}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_config_keys_mentioned_exist(page):
    assert sorted(k for k in _dotted_keys(page) if not config_docs.is_config_key(k)) == []


def test_the_pages_name_config_keys():
    """The pattern above still finds keys (a check that finds nothing passes for nothing)."""
    assert {"train.lr", "msft.budget_epochs", "data.tasks[0].train"} <= _dotted_keys(README) | _dotted_keys(
        DOCS / "getting-started.md")
    assert len(set().union(*(_dotted_keys(p) for p in PAGES))) > 60


def test_the_key_check_can_fail():
    assert config_docs.is_config_key("train.lr") and config_docs.is_config_key("data.tasks[0].columns.prompt")
    assert config_docs.is_config_key("data.tasks[i].answer_pattern") and config_docs.is_config_key("msft.max_epochs")
    for wrong in ("train.lrr", "msft.lr", "data.tasks[0].nope", "train.lr.x", "data.tasks[0].columns.a.b"):
        assert not config_docs.is_config_key(wrong), wrong


def _commands(program: str) -> list[list[str]]:
    """Every command line in the pages' code that starts with `program` (after any VAR=value),
    split as a shell would; lines continued with a backslash are joined."""
    out = []
    for page in PAGES:
        for code in _code(_text(page)):
            for line in code.replace("\\\n", " ").splitlines():
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:  # an unbalanced quote in prose-like code: not a command
                    continue
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                    words = words[1:]
                if words[:1] == [program]:
                    out.append(words)
    return out


def test_msft_fast_subcommands_are_real(capsys):
    from msft_fast.cli import main

    found = {words[1] for words in _commands("msft-fast") if len(words) > 1 and not words[1].startswith("-")}
    assert {"train", "launch", "compare", "report", "demo-data"} <= found
    for sub in sorted(found):
        try:
            code = main([sub, "--help"])
        except SystemExit as e:
            code = e.code
        assert code == 0, f"msft-fast {sub} is not a subcommand"
    capsys.readouterr()


def test_a_made_up_subcommand_is_refused(capsys):
    from msft_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["trian", "--help"])
    assert e.value.code == 2
    capsys.readouterr()


def _complete(words: list[str], until: str) -> bool:
    """A command as a user would type it, not a usage line: no `...` or `[options]` before `until`."""
    head = words[:words.index(until)] if until in words else words
    return until in words and not any(w == "..." or w.startswith("[") for w in head)


def test_launch_lines_parse_with_the_launchers_parser(capsys):
    from msft_fast.runtime.launch import parse_launch_args

    lines = [words for words in _commands("msft-fast") if words[1:2] == ["launch"] and _complete(words, "--config")]
    assert len(lines) >= 3
    for words in lines:
        args = parse_launch_args(words[2:])
        assert args is not None and args.training_script == "msft_fast.train", words
    capsys.readouterr()


def test_torchrun_lines_parse_and_name_a_real_module():
    from torch.distributed.run import get_args_parser

    lines = [words for words in _commands("torchrun") if _complete(words, "-m") and words[-1] != "-m"]
    assert len(lines) >= 2
    for words in lines:
        args = get_args_parser().parse_args(words[1:])
        assert args.module and importlib.util.find_spec(args.training_script) is not None, words


def test_make_targets_exist():
    targets = set(re.findall(r"(?m)^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text()))
    found = {m.group(1) for page in PAGES for code in _code(_text(page))
             for m in re.finditer(r"(?<![\w/-])make\s+([a-z][\w-]*)", code)}
    assert {"demo", "test"} <= found
    assert sorted(found - targets) == []


# A config that load_config accepts, under which a fragment (a section or two) is read.
BASE_CONFIG = {"output_dir": "runs/docs_check",
               "data": {"tasks": [{"name": "t", "train": "t.jsonl", "val_fraction": 0.1}]}}


def _merged(base: dict, fragment: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in fragment.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _yaml_blocks() -> list[tuple[str, str]]:
    return [(_rel(page), body) for page in PAGES for lang, body in _fences(_text(page)) if lang in ("yaml", "yml")]


def test_there_are_yaml_configs_to_check():
    assert len(_yaml_blocks()) >= 4


@pytest.mark.parametrize("where,body", _yaml_blocks(), ids=lambda x: x if "\n" not in x else "")
def test_yaml_configs_load(where, body, tmp_path):
    fragment = yaml.safe_load(body)
    assert isinstance(fragment, dict), f"{where}: a YAML block that is not a mapping of config keys"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_merged(BASE_CONFIG, fragment)))
    load_config(str(path))  # raises ConfigError naming the key that is wrong


def test_config_reference_is_what_the_schema_generates():
    text = _text(DOCS / "config.md")
    assert config_docs.replace_block(text, config_docs.render()) == text, \
        "docs/config.md is out of date: run python -m msft_fast.config_docs --write docs/config.md"


def test_config_reference_names_every_key():
    from msft_fast.config import Config

    text = _text(DOCS / "config.md")
    sections = [f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]
    for f in dataclasses.fields(Config):
        assert f"`{f.name}`" in text
    for section in sections:
        for g in dataclasses.fields(section.default_factory):
            assert f"`{section.name}.{g.name}`" in text


def test_uncommented_descriptions_are_only_for_fields_without_a_comment():
    """A field that gets a comment in config.py must lose its entry in UNCOMMENTED: one description."""
    keys = {doc.key: doc for doc in config_docs.key_docs()}
    comments = config_docs.field_comments()
    assert set(config_docs.UNCOMMENTED) <= set(keys)
    commented = [k for k in config_docs.UNCOMMENTED if (keys[k].owner, k.rsplit(".", 1)[-1]) in comments]
    assert commented == []
    assert [k for k, d in keys.items() if not d.description] == []


def test_config_docs_check_and_write(tmp_path, capsys):
    page = tmp_path / "config.md"
    page.write_text(f"intro\n\n{config_docs.BEGIN}\n| stale |\n{config_docs.END}\n\noutro\n")
    assert config_docs.main(["--check", str(page)]) == 1
    assert config_docs.main(["--write", str(page)]) == 0
    assert config_docs.main(["--check", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n") and "| `train.lr` |" in text
    (tmp_path / "bare.md").write_text("no markers\n")
    assert config_docs.main(["--check", str(tmp_path / "bare.md")]) == 2
    capsys.readouterr()


def test_field_comments_are_read_from_the_source():
    source = (
        "@dataclass\n"
        "class Section:\n"
        "    a: int = 1  # trailing wins\n"
        "    # Two lines right above\n"
        "    # a field describe it.\n"
        "    b: str = 'x # not a comment'\n"
        "    # A group header above a field with its own comment is not its description.\n"
        "    c: float = 0.0  # its own\n"
        "    # Separated by a blank line: not b's, not d's.\n"
        "\n"
        "    d: bool = False\n"
    )
    assert config_docs.field_comments(source) == {
        ("Section", "a"): "trailing wins", ("Section", "b"): "Two lines right above a field describe it.",
        ("Section", "c"): "its own"}
    real = config_docs.field_comments()
    assert real[("MsftConfig", "max_epochs")].startswith("Compute bound:")  # read from config.py itself


# --- The import rules of docs/architecture.md ---------------------------------------------------

def _imports(path: Path) -> set[str]:
    """Modules a file imports anywhere (lazy imports in functions too); `from msft_fast import x`
    counts as msft_fast.x."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module == "msft_fast":  # from msft_fast import checkpoint
                out |= {f"msft_fast.{a.name}" for a in node.names}
    return out


def _module_files(prefix: str) -> list[Path]:
    """The files of `msft_fast.x` whether it is a module or a package."""
    rel = Path(*prefix.split("."))
    files = [ROOT / rel.with_suffix(".py")] if (ROOT / rel.with_suffix(".py")).exists() else []
    return (files + sorted((ROOT / rel).rglob("*.py"))) if (ROOT / rel).is_dir() else files


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


HIGHER = {  # importer -> what it must never import
    "msft_fast.data": ["msft_fast.model", "msft_fast.attention", "msft_fast.training", "msft_fast.methods",
                       "msft_fast.run", "msft_fast.cli"],
    "msft_fast.model": ["msft_fast.training", "msft_fast.methods", "msft_fast.run", "msft_fast.cli"],
    "msft_fast.attention": ["msft_fast.training", "msft_fast.methods", "msft_fast.run", "msft_fast.cli"],
    "msft_fast.state": ["msft_fast.training", "msft_fast.methods", "msft_fast.run", "msft_fast.cli"],
    "msft_fast.runtime": ["msft_fast.training", "msft_fast.methods", "msft_fast.run", "msft_fast.cli"],
    "msft_fast.training": ["msft_fast.methods", "msft_fast.run", "msft_fast.cli"],
    "msft_fast.methods": ["msft_fast.run", "msft_fast.cli"],
    "msft_fast.report": ["torch", "msft_fast.training", "msft_fast.model", "msft_fast.methods", "msft_fast.run",
                         "msft_fast.cli", "msft_fast.runtime", "msft_fast.state.snapshot", "msft_fast.state.checkpoint"],
}


@pytest.mark.parametrize("importer", sorted(HIGHER))
def test_imports_point_one_way(importer):
    files = _module_files(importer)
    assert files, f"{importer} has no files: update the rules here and in docs/architecture.md"
    wrong = sorted(f"{_rel(f)} imports {name}" for f in files for name in _imports(f) if _under(name, HIGHER[importer]))
    assert wrong == []


def test_kernels_know_nothing_about_training_and_the_trainer_nothing_about_triton():
    wrong = sorted(f"{_rel(f)} imports {name}" for f in (ROOT / "kernels").rglob("*.py")
                   for name in _imports(f) if _under(name, ["msft_fast", "transformers"]))
    wrong += sorted(f"{_rel(f)} imports {name}" for f in (ROOT / "msft_fast").rglob("*.py")
                    for name in _imports(f) if _under(name, ["triton"]))
    assert wrong == []


def test_only_the_entry_points_import_the_command_line():
    entry = {ROOT / "msft_fast" / "__main__.py", ROOT / "msft_fast" / "train.py", ROOT / "msft_fast" / "cli.py"}
    wrong = sorted(_rel(f) for f in (ROOT / "msft_fast").rglob("*.py")
                   if f not in entry and _under_any(_imports(f), ["msft_fast.cli"]))
    assert wrong == []


def test_config_is_the_bottom():
    names = {n for n in _imports(ROOT / "msft_fast" / "config.py") if n.startswith("msft_fast")}
    assert names <= {"msft_fast.errors"}


def _under_any(names, prefixes) -> bool:
    return any(_under(n, prefixes) for n in names)
