"""Bad input, one case per kind (issue 7, item 1), through the real `msft-fast train` command.

Fatal cases must end with exit code 2, exactly one line `msft-fast: error: ...` on stderr that
names the file/row/key at fault, no traceback, and no output folder that looks finished.
Skipped-and-counted cases must train and record what they skipped. Most cases call the CLI
in-process (cli.main; a subprocess costs seconds of interpreter start-up each); two run it as a
real subprocess to prove the exit status and the absence of a traceback end to end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import yaml
from conftest import tiny_llama, write_jsonl

from msft_fast.cli import main

USER_ERROR_EXIT = 2  # every UserError (config, data, model folder, output folder)


def _pc(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"rev {i}: ", "completion": f"{i}x"[::-1]} for i in range(offset, offset + n)]


def _chat(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """User model folders: a good one and broken copies of it (built once for the module)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad-models")
    good = root / "good"
    tiny_llama(tokenizer, seed=3).save_pretrained(good)
    tokenizer.save_pretrained(good)

    def variant(name: str, edit: Callable) -> str:
        folder = root / name
        shutil.copytree(good, folder)
        edit(folder)
        return str(folder)

    def edit_json(file: str, change: Callable) -> Callable:
        def edit(folder):
            data = json.loads((folder / file).read_text())
            change(data)
            (folder / file).write_text(json.dumps(data))
        return edit

    def drop_tensor(folder):
        tensors = load_file(folder / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    def drop_chat_template(folder):
        edit_json("tokenizer_config.json", lambda c: c.pop("chat_template", None))(folder)
        for f in folder.glob("*.jinja"):
            f.unlink()

    return {
        "good": str(good),
        "bad_config": variant("bad_config", lambda f: (f / "config.json").write_text("{\"model_type\": ")),
        "bad_weights": variant("bad_weights", lambda f: (f / "model.safetensors").write_bytes(b"not a tensor file")),
        "wrong_shapes": variant("wrong_shapes", edit_json("config.json", lambda c: c.update(hidden_size=64))),
        "incomplete": variant("incomplete", drop_tensor),
        "no_chat_template": variant("no_chat_template", drop_chat_template),
    }


@dataclass
class Ctx:
    """What a case builds its config from: a tmp folder, good data files and model folders."""

    tmp: object  # pathlib.Path
    models: dict

    def write(self, name: str, rows: list) -> str:
        return write_jsonl(self.tmp / "data" / name, rows)

    @property
    def good_train(self) -> str:
        return self.write("good_train.jsonl", _pc(8))

    @property
    def good_val(self) -> str:
        return self.write("good_val.jsonl", _pc(3, offset=50))

    def task(self, name="t", train=None, val=None, **kw) -> dict:
        task = {"name": name, "train": train or self.good_train, **kw}
        if "val_fraction" not in kw:
            task["val"] = val or self.good_val
        return task

    def config(self, tasks=None, model="builtin:tiny-llama", **sections) -> dict:
        cfg = {
            "output_dir": str(self.tmp / "run"),
            "model": {"path": model},
            "data": {"tasks": tasks or [self.task()], "max_seq_len": 64, "tokens_per_batch": 256,
                     "cache_dir": str(self.tmp / "cache")},
            "train": {"progress": False, "epochs": 1},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        return cfg


def _train_file_with(ctx: Ctx, bad_row, fmt="pc") -> str:
    """A train file whose 4th row (and line) is `bad_row`."""
    good = _pc(5) if fmt == "pc" else _chat(5)
    return ctx.write("bad_train.jsonl", good[:3] + [bad_row] + good[3:])


def _chat_task(ctx: Ctx, bad_row) -> dict:
    return ctx.task(train=_train_file_with(ctx, bad_row, fmt="chat"), val=ctx.write("chat_val.jsonl", _chat(2, 50)))


def _a_file(ctx: Ctx, name: str) -> str:
    (ctx.tmp / name).write_text("x")
    return str(ctx.tmp / name)


def _file_under_a_file(ctx: Ctx) -> str:
    return os.path.join(_a_file(ctx, "plain_file"), "run")


# Each case: (id, config builder, strings the one error line must contain). Paths are checked
# through "{tmp}", which stands for the case's tmp folder.
FATAL_CASES = [
    # --- data files -------------------------------------------------------------------------
    ("file_missing",
     lambda c: c.config([c.task(train=str(c.tmp / "data" / "nope.jsonl"))]),
     ["task 't': train file {tmp}/data/nope.jsonl does not exist", "data.tasks[0].train"]),
    ("jsonl_line_not_json",
     lambda c: c.config([c.task(train=_train_file_with(c, '{"prompt": "a", "completion": '))]),
     ["{tmp}/data/bad_train.jsonl: line 4 is not valid JSON"]),
    ("jsonl_line_not_an_object",
     lambda c: c.config([c.task(train=_train_file_with(c, "[1, 2]"))]),
     ["{tmp}/data/bad_train.jsonl: line 4 is not a JSON object"]),
    ("row_missing_completion",
     lambda c: c.config([c.task(train=_train_file_with(c, {"prompt": "only"}))]),
     ["{tmp}/data/bad_train.jsonl: row 4: missing field 'completion'"]),
    ("row_completion_wrong_type",
     lambda c: c.config([c.task(train=_train_file_with(c, {"prompt": "p", "completion": 3}))]),
     ["{tmp}/data/bad_train.jsonl: row 4: field 'completion' must be a str, got int"]),
    ("row_messages_wrong_type",
     lambda c: c.config([_chat_task(c, {"messages": "hello"})]),
     ["{tmp}/data/bad_train.jsonl: row 4: field 'messages' must be a list, got str"]),
    ("row_without_any_known_field",
     lambda c: c.config([c.task(train=c.write("qa.jsonl", [{"question": "q", "answer": "a"}] * 3))]),
     ["task 't': train file {tmp}/data/qa.jsonl: cannot tell the format"]),
    ("roles_out_of_order",
     lambda c: c.config([_chat_task(c, {"messages": [{"role": "assistant", "content": "a"},
                                                      {"role": "user", "content": "q"}]})]),
     ["{tmp}/data/bad_train.jsonl: row 4: roles out of order: message 0 is 'assistant'"]),
    ("no_assistant_turn",
     lambda c: c.config([_chat_task(c, {"messages": [{"role": "user", "content": "q"}]})]),
     ["{tmp}/data/bad_train.jsonl: row 4: 'messages' has no assistant turn"]),
    ("assistant_reply_missing_at_end",
     lambda c: c.config([_chat_task(c, {"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"},
                                                      {"role": "user", "content": "q2"}]})]),
     ["{tmp}/data/bad_train.jsonl: row 4: the last message is 'user'"]),
    # --- empty tasks and splits ---------------------------------------------------------------
    ("task_without_rows",
     lambda c: c.config([c.task(train=c.write("empty.jsonl", []))]),
     ["task 't': train file {tmp}/data/empty.jsonl has no rows"]),
    ("task_every_row_overlong",
     lambda c: c.config([c.task(train=c.write("long.jsonl", [{"prompt": "p" * 80, "completion": "c"}] * 3))],
                        data={"overlong": "drop"}),
     ["task 't' has no usable training rows in {tmp}/data/long.jsonl", "dropped_overlong: 3", "data.max_seq_len"]),
    ("validation_file_empty",
     lambda c: c.config([c.task(val=c.write("empty_val.jsonl", []))]),
     ["task 't': validation file {tmp}/data/empty_val.jsonl has no rows"]),
    ("validation_fraction_of_one_row",
     lambda c: c.config([c.task(train=c.write("one.jsonl", _pc(1)), val_fraction=0.5)]),
     ["task 't' has an empty validation split", "val_fraction=0.5"]),
    ("two_tasks_same_name",
     lambda c: c.config([c.task(), c.task()]),
     ["config key 'data.tasks[1].name': task name 't' is used twice"]),
    ("tokenizer_without_chat_template",
     lambda c: c.config([_chat_task(c, _chat(1, 9)[0])], model=c.models["no_chat_template"]),
     ["task 't': train file {tmp}/data/bad_train.jsonl: the tokenizer has no chat template"]),
    # --- model folder ----------------------------------------------------------------------
    ("model_folder_missing",
     lambda c: c.config(model=str(c.tmp / "no_model")),
     ["model folder {tmp}/no_model does not exist (config key 'model.path')"]),
    ("model_config_not_json",
     lambda c: c.config(model=c.models["bad_config"]),
     ["cannot load the model folder", "bad_config", "config.json"]),
    ("model_weights_unreadable",
     lambda c: c.config(model=c.models["bad_weights"]),
     ["cannot load the model folder", "bad_weights", "deserializ"]),
    ("model_weights_wrong_shapes",
     lambda c: c.config(model=c.models["wrong_shapes"]),
     ["wrong_shapes has 21 weight(s) whose shape", "shape does not match its config.json", "checkpoint [104, 32], config [104, 64]"]),
    ("model_weights_incomplete",
     lambda c: c.config(model=c.models["incomplete"]),
     ["incomplete has no weights for 1 parameter(s) (model.layers.1.mlp.up_proj.weight)"]),
    # --- config values -----------------------------------------------------------------------
    ("negative_lr", lambda c: c.config(train={"lr": -1e-4}),
     ["config key 'train.lr' must be a positive number, got -0.0001"]),
    ("zero_tokens_per_batch", lambda c: c.config(data={"tokens_per_batch": 0}),
     ["config key 'data.tokens_per_batch' must be a positive number of tokens, got 0"]),
    ("evals_per_epoch_zero", lambda c: c.config(msft={"evals_per_epoch": 0}),
     ["config key 'msft.evals_per_epoch' must be at least 1, got 0"]),
    ("budget_epochs_zero", lambda c: c.config(method="msft", msft={"budget_epochs": 0}),
     ["config key 'msft.budget_epochs' must be a positive number, got 0.0"]),
    ("max_seq_len_above_positions", lambda c: c.config(data={"max_seq_len": 4096, "tokens_per_batch": 4096}),
     ["config key 'data.max_seq_len' (4096) exceeds the model's position limit (2048)"]),
    # --- exact match of generated answers (msft.metric=val_exact_match) -------------------------
    ("answer_pattern_not_a_regex", lambda c: c.config(msft={"metric": "val_exact_match", "answer_pattern": "####(.+"}),
     ["config key 'msft.answer_pattern' ('####(.+') is not a valid regular expression: missing ), unterminated"]),
    ("task_answer_pattern_not_a_regex", lambda c: c.config([c.task(answer_pattern="[0-9")]),
     ["config key 'data.tasks[0].answer_pattern' ('[0-9') is not a valid regular expression"]),
    ("exact_match_of_a_text_task",
     lambda c: c.config([c.task(), c.task("prose", train=c.write("text.jsonl", [{"text": "abc"}] * 4),
                                          val=c.write("text_val.jsonl", [{"text": "abd"}] * 2))],
                        msft={"metric": "val_exact_match"}),
     ["config key 'data.tasks[1]': task 'prose' has plain-text rows, with no prompt to generate an answer from",
      "msft.metric=val_exact_match"]),
    ("reference_answer_without_the_pattern",
     lambda c: c.config(msft={"report_exact_match": True, "answer_pattern": r"####\s*(.+)"}),
     ["task 't': the reference answer of validation document 1 ('x05') does not match msft.answer_pattern "
      "('####\\s*(.+)')"]),
    # --- output folder -----------------------------------------------------------------------
    ("output_dir_is_a_file",
     lambda c: c.config(output_dir=_a_file(c, "out_file")),
     ["output_dir {tmp}/out_file is a file, not a folder"]),
    # Tests run as root, so a chmod-protected folder would still be writable here; a path below a
    # regular file cannot be created by anyone, root included.
    ("output_dir_below_a_file",
     lambda c: c.config(output_dir=_file_under_a_file(c)),
     ["output_dir {tmp}/plain_file/run is not writable (Not a directory)"]),
]


def _write_config(tmp_path, cfg: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _error_line(code: int, err: str) -> str:
    """The run failed the documented way: return its one error line."""
    assert code == USER_ERROR_EXIT, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("msft-fast: error:")]
    assert len(errors) == 1, err
    # Nothing else on stderr but our own log lines (timestamped): no warnings from the libraries.
    others = [line for line in err.splitlines() if line.strip() and line not in errors and " INFO " not in line]
    assert not others, err
    return errors[0]


def _assert_not_finished(out_dir) -> None:
    if os.path.isdir(out_dir):
        assert not os.path.exists(os.path.join(out_dir, "history.json"))
        assert not os.path.exists(os.path.join(out_dir, "final"))


@pytest.mark.parametrize("case_id, build, needles", FATAL_CASES, ids=[c[0] for c in FATAL_CASES])
def test_fatal_bad_input_is_one_clear_line(case_id, build, needles, tmp_path, models, capsys):
    cfg = build(Ctx(tmp_path, models))
    code = main(["train", "--config", _write_config(tmp_path, cfg)])
    line = _error_line(code, capsys.readouterr().err)
    for needle in needles:
        assert needle.format(tmp=tmp_path) in line
    _assert_not_finished(cfg["output_dir"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see output_dir_below_a_file")
def test_read_only_output_dir(tmp_path, capsys):
    ctx = Ctx(tmp_path, {})
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code = main(["train", "--config", _write_config(tmp_path, ctx.config(output_dir=str(out)))])
        assert f"output_dir {out} is not writable" in _error_line(code, capsys.readouterr().err)
    finally:
        out.chmod(0o700)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders without read permission")
def test_unreadable_model_folder(tmp_path, models, capsys):
    folder = tmp_path / "locked"
    shutil.copytree(models["good"], folder)
    folder.chmod(0o000)
    try:
        code = main(["train", "--config", _write_config(tmp_path, Ctx(tmp_path, models).config(model=str(folder)))])
        assert f"model folder {folder} cannot be read" in _error_line(code, capsys.readouterr().err)
    finally:
        folder.chmod(0o700)


def test_model_folder_that_cannot_be_listed(tmp_path, models, capsys, monkeypatch):
    """The same refusal as above where permission bits cannot cause it (root): listing fails."""
    import msft_fast.model as model_mod

    folder = tmp_path / "locked"
    shutil.copytree(models["good"], folder)
    real = model_mod.os.listdir

    def listdir(path="."):
        if os.path.abspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(model_mod.os, "listdir", listdir)
    code = main(["train", "--config", _write_config(tmp_path, Ctx(tmp_path, models).config(model=str(folder)))])
    assert f"model folder {folder} cannot be read (Permission denied)" in _error_line(code, capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# Skipped and counted: the run goes on and records what it left out.


def test_rows_without_trained_tokens_and_overlong_rows_are_skipped_and_counted(tmp_path, capsys, caplog):
    ctx = Ctx(tmp_path, {})
    rows = _pc(6) + [
        {"prompt": "p" * 80, "completion": "c"},  # truncated to its prompt: no trained token left
        {"prompt": "p", "completion": "c" * 80},  # truncated, completion partly kept: trained
    ]
    val = _pc(2, 50) + [{"prompt": "q" * 80, "completion": "c"}]
    cfg = ctx.config([ctx.task(train=ctx.write("mixed.jsonl", rows), val=ctx.write("mixed_val.jsonl", val))])
    with caplog.at_level("INFO", logger="msft_fast"):
        code = main(["train", "--config", _write_config(tmp_path, cfg)])
    assert code == 0, capsys.readouterr().err
    counts = json.load(open(tmp_path / "run" / "history.json"))["data"]["t"]
    assert counts["train_rows"] == 8 and counts["train_dropped_no_trained_tokens"] == 1
    assert counts["train_truncated"] == 1 and counts["val_dropped_no_trained_tokens"] == 1
    assert any("dropped_no_trained_tokens=1" in r.getMessage() for r in caplog.records)
    # 1 of 8 rows (12.5%) lost to max_seq_len and 1 truncated: more than a tenth each, so warnings, not INFO.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("task 't': 1 of 8 train rows (12%) are lost: truncated by data.max_seq_len" in w for w in warnings)
    assert any("task 't': 1 of 8 train rows (12%) are truncated to data.max_seq_len=64" in w for w in warnings)
    assert counts["train_docs"] == 7 and counts["val_docs"] == 2


def test_some_overlong_rows_dropped_are_counted(tmp_path, capsys):
    ctx = Ctx(tmp_path, {})
    rows = _pc(6) + [{"prompt": "p", "completion": "c" * 80}] * 2
    cfg = ctx.config([ctx.task(train=ctx.write("long.jsonl", rows))], data={"overlong": "drop"})
    code = main(["train", "--config", _write_config(tmp_path, cfg)])
    assert code == 0, capsys.readouterr().err
    counts = json.load(open(tmp_path / "run" / "history.json"))["data"]["t"]
    assert counts["train_rows"] == 8 and counts["train_dropped_overlong"] == 2 and counts["train_truncated"] == 0


# ---------------------------------------------------------------------------------------------
# Order: user input is judged before the weights exist (so before any device memory is taken).


def _count_model_builds(monkeypatch) -> list:
    from transformers import AutoModelForCausalLM

    built = []
    for name in ("from_config", "from_pretrained"):
        real = getattr(AutoModelForCausalLM, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            built.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(AutoModelForCausalLM, name, spy)
    return built


def test_config_errors_come_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    built = _count_model_builds(monkeypatch)
    code = main(["train", "--config", _write_config(tmp_path, Ctx(tmp_path, {}).config(train={"lr": -1.0}))])
    assert "train.lr" in _error_line(code, capsys.readouterr().err) and built == []


def test_data_errors_come_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    built = _count_model_builds(monkeypatch)
    ctx = Ctx(tmp_path, {})
    cfg = ctx.config([ctx.task(train=_train_file_with(ctx, {"prompt": "only"}))])
    code = main(["train", "--config", _write_config(tmp_path, cfg)])
    assert "missing field 'completion'" in _error_line(code, capsys.readouterr().err)
    assert built == []


# ---------------------------------------------------------------------------------------------
# End to end in a real process: exit status and stderr as a user sees them.


def _cli_subprocess(tmp_path, cfg: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "msft_fast", "train", "--config", _write_config(tmp_path, cfg)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_subprocess_bad_chat_row(tmp_path):
    ctx = Ctx(tmp_path, {})
    cfg = ctx.config([_chat_task(ctx, {"messages": [{"role": "user", "content": "q"},
                                                     {"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]})])
    proc = _cli_subprocess(tmp_path, cfg)
    line = _error_line(proc.returncode, proc.stderr)
    assert f"{tmp_path}/data/bad_train.jsonl: row 4: roles out of order: message 1 is 'user'" in line
    _assert_not_finished(cfg["output_dir"])


def test_subprocess_unreadable_model_weights(tmp_path, models):
    cfg = Ctx(tmp_path, models).config(model=models["bad_weights"])
    proc = _cli_subprocess(tmp_path, cfg)
    line = _error_line(proc.returncode, proc.stderr)
    assert f"cannot load the model folder {models['bad_weights']}" in line
    _assert_not_finished(cfg["output_dir"])


# ---------------------------------------------------------------------------------------------
# load_model: HF's load report is held back on failure and passed on on success.


def test_held_logs_pass_on_only_on_success():
    import logging

    from msft_fast.model import _held_logs

    logger = logging.getLogger("msft_fast_test_held")
    seen = []
    sink = logging.Handler()
    sink.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(sink)
    logger.propagate = False
    try:
        with pytest.raises(ValueError), _held_logs(logger.name):
            logger.warning("report of a failed load")
            raise ValueError
        assert seen == []
        with _held_logs(logger.name) as held:
            logger.warning("report of a good load")
            assert seen == []
            held.pass_on()
        assert seen == ["report of a good load"] and logger.handlers == [sink]
    finally:
        logger.removeHandler(sink)


def test_a_good_folder_with_an_extra_tensor_loads(tmp_path, models):
    import torch
    from safetensors.torch import load_file, save_file

    from msft_fast.config import ModelConfig
    from msft_fast.model import load_model

    folder = tmp_path / "extra"
    shutil.copytree(models["good"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.unused_buffer"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(ModelConfig(path=str(folder)), "fp32", torch.device("cpu"), seed=0)
    assert loaded.model.get_input_embeddings().weight.shape == (104, 32)
