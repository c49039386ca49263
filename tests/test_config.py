"""Config loading: YAML file + dotted overrides, and one-sentence ConfigErrors naming the key."""
from __future__ import annotations

import textwrap

import pytest

from msft_fast.config import Config, TaskConfig, load_config
from msft_fast.errors import ConfigError

BASE_YAML = textwrap.dedent(
    """\
    output_dir: runs/x
    method: msft
    model:
      path: builtin:tiny-llama
    data:
      max_seq_len: 64
      tokens_per_batch: 256
      tasks:
        - {name: t1, train: t1/train.jsonl, val: t1/val.jsonl}
        - {name: t2, train: t2/train.jsonl, val_fraction: 0.2}
    train:
      lr: 3.0e-4
      epochs: 2
      grad_accum: 2
    msft:
      evals_per_epoch: 2
    """
)

ONE_TASK = ["data.tasks=[{name: a, train: a.jsonl, val: b.jsonl}]"]


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text(BASE_YAML)
    return str(p)


def _err(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


def _ok(overrides) -> list[str]:
    return ["output_dir=out"] + ONE_TASK + list(overrides)


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_yaml_nested_sections(cfg_file):
    cfg = load_config(cfg_file)
    assert isinstance(cfg, Config)
    assert cfg.output_dir == "runs/x"
    assert cfg.method == "msft"
    assert cfg.model.path == "builtin:tiny-llama"
    assert cfg.data.max_seq_len == 64 and cfg.data.tokens_per_batch == 256
    assert cfg.data.tasks == [
        TaskConfig(name="t1", train="t1/train.jsonl", val="t1/val.jsonl"),
        TaskConfig(name="t2", train="t2/train.jsonl", val_fraction=0.2),
    ]
    assert cfg.train.lr == pytest.approx(3e-4)
    assert isinstance(cfg.train.epochs, float) and cfg.train.epochs == 2.0
    assert cfg.train.grad_accum == 2
    assert cfg.msft.evals_per_epoch == 2
    # untouched keys keep their defaults
    assert cfg.train.schedule == "cosine"
    assert cfg.msft.budget_epochs == 1.0
    assert cfg.data.overlong == "truncate"


def test_overrides_win_over_file(cfg_file):
    cfg = load_config(
        cfg_file,
        [
            "train.lr=1e-4",
            "method=sft",
            "data.tasks=[{name: a, train: x.jsonl, val: y.jsonl}]",
            "data.overlong=drop",
            "msft.budget_epochs=0.5",
        ],
    )
    assert cfg.method == "sft"
    assert cfg.data.tasks == [TaskConfig(name="a", train="x.jsonl", val="y.jsonl")]
    assert cfg.data.overlong == "drop"
    assert cfg.msft.budget_epochs == 0.5
    # other file values survive
    assert cfg.data.max_seq_len == 64 and cfg.train.grad_accum == 2


def test_yaml_string_exponent_parses_as_float(cfg_file, tmp_path):
    # PyYAML reads "1e-4" (no dot) as a string; float keys must still accept it.
    cfg = load_config(cfg_file, ["train.lr=1e-4"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-4)
    p = tmp_path / "exp.yaml"
    p.write_text(BASE_YAML.replace("lr: 3.0e-4", "lr: 5e-5"))
    cfg = load_config(str(p))
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(5e-5)


def test_overrides_only_without_file():
    cfg = load_config(None, _ok(["train.seed=7", "train.progress=false"]))
    assert cfg.output_dir == "out" and cfg.train.seed == 7 and cfg.train.progress is False
    assert cfg.to_dict()["data"]["tasks"][0]["name"] == "a"


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_key_with_suggestion(cfg_file):
    msg = _err(cfg_file, ["train.lrr=1"])
    assert "train.lrr" in msg
    assert "did you mean" in msg and "'train.lr'" in msg


def test_unknown_top_level_section(cfg_file):
    msg = _err(cfg_file, ["trian.lr=1"])
    assert "trian" in msg and "unknown" in msg
    msg = _err(cfg_file, ["optimizer.lr=1"])
    assert "optimizer" in msg and "unknown" in msg


def test_wrong_type(cfg_file):
    msg = _err(cfg_file, ["train.grad_accum=two"])
    assert "train.grad_accum" in msg and "int" in msg and "two" in msg
    msg = _err(cfg_file, ["train.lr=fast"])
    assert "train.lr" in msg and "float" in msg
    msg = _err(cfg_file, ["train.grad_accum=true"])  # bool is not an int
    assert "train.grad_accum" in msg


def test_section_given_as_scalar(cfg_file):
    msg = _err(cfg_file, ["msft=3"])
    assert "msft" in msg and "mapping" in msg


def test_literal_out_of_range(cfg_file):
    msg = _err(cfg_file, ["method=dpo"])
    assert "method" in msg and "dpo" in msg
    for choice in ("sft", "msft", "sro"):
        assert choice in msg
    msg = _err(cfg_file, ["train.schedule=step"])
    assert "train.schedule" in msg and "cosine" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1e-4", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("data.tokens_per_batch=0", "data.tokens_per_batch"),
        ("msft.evals_per_epoch=0", "msft.evals_per_epoch"),
        ("msft.budget_epochs=0", "msft.budget_epochs"),
        ("train.epochs=0", "train.epochs"),
        ("train.beta2=1.0", "train.beta2"),
        ("data.max_seq_len=1", "data.max_seq_len"),
        ("data.tasks=[]", "data.tasks"),
        ("train.lr=.nan", "train.lr"),
        ("msft.budget_epochs=.inf", "msft.budget_epochs"),
        ("data.split_seed=-1", "data.split_seed"),
        ("train.seed=-1", "train.seed"),
    ],
)
def test_bad_values(cfg_file, override, key):
    msg = _err(cfg_file, [override])
    assert key in msg


def test_tokens_per_batch_below_max_seq_len(cfg_file):
    msg = _err(cfg_file, ["data.max_seq_len=512", "data.tokens_per_batch=256"])
    assert "data.tokens_per_batch" in msg and "data.max_seq_len" in msg
    # equal is fine
    cfg = load_config(cfg_file, ["data.max_seq_len=256", "data.tokens_per_batch=256"])
    assert cfg.data.tokens_per_batch == cfg.data.max_seq_len == 256


@pytest.mark.parametrize(
    "task",
    [
        "{name: a, train: a.jsonl, val: b.jsonl, val_fraction: 0.1}",  # both
        "{name: a, train: a.jsonl}",  # neither
    ],
)
def test_task_needs_exactly_one_val_source(cfg_file, task):
    msg = _err(cfg_file, [f"data.tasks=[{task}]"])
    assert "data.tasks[0]" in msg and "'a'" in msg
    assert "val" in msg and "val_fraction" in msg


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_val_fraction_outside_open_unit_interval(cfg_file, fraction):
    msg = _err(cfg_file, [f"data.tasks=[{{name: a, train: a.jsonl, val_fraction: {fraction}}}]"])
    assert "data.tasks[0].val_fraction" in msg


def test_duplicate_task_names(cfg_file):
    msg = _err(
        cfg_file,
        ["data.tasks=[{name: a, train: a.jsonl, val: b.jsonl}, {name: a, train: c.jsonl, val: d.jsonl}]"],
    )
    assert "data.tasks[1].name" in msg and "'a'" in msg and "twice" in msg


def test_task_missing_required_field(cfg_file):
    msg = _err(cfg_file, ["data.tasks=[{name: a, val: b.jsonl}]"])
    assert "data.tasks[0].train" in msg and "required" in msg


def test_unknown_task_key_suggests(cfg_file):
    msg = _err(cfg_file, ["data.tasks=[{name: a, train: a.jsonl, vall: b.jsonl}]"])
    assert "data.tasks[0].vall" in msg and "did you mean" in msg


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _err(str(missing))
    assert str(missing) in msg and "does not exist" in msg


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("output_dir: out\ntrain: {lr: [1, 2\n")
    msg = _err(str(p))
    assert str(p) in msg and "not valid YAML" in msg


def test_yaml_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    msg = _err(str(p))
    assert str(p) in msg and "mapping" in msg


def test_missing_output_dir(cfg_file, tmp_path):
    p = tmp_path / "no_out.yaml"
    p.write_text(BASE_YAML.replace("output_dir: runs/x\n", ""))
    msg = _err(str(p))
    assert "output_dir" in msg and "required" in msg
    msg = _err(cfg_file, ["output_dir="])  # present but empty
    assert "output_dir" in msg


@pytest.mark.parametrize("item", ["train.lr", "=3"])
def test_override_without_equals(cfg_file, item):
    msg = _err(cfg_file, [item])
    assert f"'{item}'" in msg and "key.path=value" in msg


def test_override_into_non_section(cfg_file):
    msg = _err(cfg_file, ["output_dir.x=1"])
    assert "output_dir" in msg and "not a section" in msg


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_config_error_is_one_line_exit_2(tmp_path, capsys):
    from msft_fast.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: out\ntrain:\n  lrr: 1\n")
    code = main(["train", "--config", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("msft-fast: error:")
    assert "train.lrr" in lines[0]
    assert "Traceback" not in err


def test_cli_flags_may_come_anywhere_among_the_overrides(tmp_path, monkeypatch):
    """`train --config c.yaml out=x --overwrite method=sft`: every override reaches the config, in order."""
    from msft_fast import cli, run

    seen = {}
    monkeypatch.setattr(run, "train", lambda cfg, overwrite, config_error: seen.update(cfg=cfg, overwrite=overwrite))
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: a\ndata: {tasks: [{name: t, train: t.jsonl, val_fraction: 0.1}]}\n")
    assert cli.main(["train", "--config", str(path), "output_dir=b", "--overwrite", "method=sft",
                     "train.lr=1e-4", "train.lr=2e-4"]) == 0
    assert seen["overwrite"] and seen["cfg"].output_dir == "b" and seen["cfg"].method == "sft"
    assert seen["cfg"].train.lr == 2e-4  # the later of two overrides wins, as written
    with pytest.raises(SystemExit) as e:  # argparse's own refusal of an unknown flag
        cli.main(["train", "--config", str(path), "method=sft", "--bogus"])
    assert e.value.code == 2


def test_cli_missing_config_file(tmp_path, capsys):
    from msft_fast.cli import main

    code = main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("msft-fast: error:")
    assert "missing.yaml" in lines[0] and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Overrides into lists, keys given without their section, a forgotten --config (issue 19)


def test_index_overrides_reach_into_the_task_list(cfg_file):
    cfg = load_config(cfg_file, ["data.tasks[0].train=other.jsonl", "data.tasks[1].val_fraction=0.5",
                                 "data.tasks[1]={name: t3, train: t3.jsonl, val: v.jsonl}"])
    assert cfg.data.tasks[0].train == "other.jsonl" and cfg.data.tasks[0].val == "t1/val.jsonl"
    assert (cfg.data.tasks[1].name, cfg.data.tasks[1].val_fraction) == ("t3", None)
    # The same key names the errors use (config key 'data.tasks[0].train') work as overrides.
    assert load_config(cfg_file, ["data.tasks[1].val_fraction=0.5"]).data.tasks[1].val_fraction == 0.5
    msg = _err(cfg_file, ["data.tasks[2].train=x.jsonl"])
    assert "data.tasks has 2 entries (indexes 0 to 1)" in msg and "data.tasks=[...]" in msg
    msg = _err(None, ["output_dir=o", "data.tasks[0].train=x.jsonl"])
    assert "data.tasks is not set, so it has no [0]" in msg
    msg = _err(cfg_file, ["data.tasks[0].trian=x"])
    assert "unknown config key 'data.tasks[0].trian' (did you mean 'data.tasks[0].train'?)" in msg
    assert "is not a list" in _err(cfg_file, ["train.lr[0]=1"])
    assert "data.tasks is not a section" in _err(cfg_file, ["data.tasks.train=x"])


@pytest.mark.parametrize("override,meant", [
    ("lr=1e-3", "train.lr"), ("budget_epochs=2", "msft.budget_epochs"), ("max_seq_len=128", "data.max_seq_len"),
    ("train.budget_epochs=2", "msft.budget_epochs"), ("val_fraction=0.1", "data.tasks[i].val_fraction"),
])
def test_a_key_without_its_section_names_the_section(cfg_file, override, meant):
    key = override.partition("=")[0]
    assert f"unknown config key '{key}' (did you mean '{meant}'?)" in _err(cfg_file, [override])


def test_cli_without_config_says_so(tmp_path, capsys):
    from msft_fast.cli import main

    for argv in (["train"], ["train", "train.lr=1e-3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("msft-fast: error: no config file given: run `msft-fast train "
                                                   "--config FILE.yaml"), err


def test_compute_bound_keys(cfg_file):
    from msft_fast.config import max_trained_epochs

    cfg = load_config(cfg_file)
    assert cfg.msft.max_epochs is None and max_trained_epochs(cfg) == 4.0  # 2 x train.epochs
    assert max_trained_epochs(load_config(cfg_file, ["msft.max_epochs=3.5"])) == 3.5
    for unbounded in ("inf", ".inf"):
        assert max_trained_epochs(load_config(cfg_file, [f"msft.max_epochs={unbounded}"])) == float("inf")
    assert "msft.max_epochs" in _err(cfg_file, ["msft.max_epochs=0"])
    assert "msft.max_epochs" in _err(cfg_file, ["msft.max_epochs=nan"])
    assert load_config(cfg_file, ["msft.max_stale_stages=2"]).msft.max_stale_stages == 2
    assert "msft.max_stale_stages" in _err(cfg_file, ["msft.max_stale_stages=0"])
    assert "train.progress_interval" in _err(cfg_file, ["train.progress_interval=0"])


def test_exact_match_keys(cfg_file):
    from msft_fast.config import scores_exact_match

    cfg = load_config(cfg_file)
    assert not scores_exact_match(cfg) and cfg.msft.min_delta == 0.0 and cfg.msft.generation_gather == "auto"
    cfg = load_config(cfg_file, ["msft.metric=val_exact_match", r"msft.answer_pattern='####\s*(.+)'",
                                 "msft.max_new_tokens=32", "msft.min_delta=0.02", "data.tasks[0].answer_pattern=''"])
    assert scores_exact_match(cfg) and cfg.msft.answer_pattern == r"####\s*(.+)" and cfg.msft.max_new_tokens == 32
    assert cfg.data.tasks[0].answer_pattern == "" and cfg.msft.min_delta == 0.02
    assert scores_exact_match(load_config(cfg_file, ["msft.report_exact_match=true"]))
    for override, key in (("msft.min_delta=-0.1", "msft.min_delta"), ("msft.min_delta=.nan", "msft.min_delta"),
                          ("msft.max_new_tokens=0", "msft.max_new_tokens"),
                          ("msft.generation_tokens_per_batch=0", "msft.generation_tokens_per_batch"),
                          ("msft.generation_gather=always", "msft.generation_gather"),
                          ("msft.metric=exact_match", "msft.metric")):
        assert key in _err(cfg_file, [override]), override


def test_the_paper_preset_holds_the_papers_settings_and_names_its_placeholders():
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paper = os.path.join(repo, "configs", "paper.yaml")
    msg = _err(paper, [])
    assert msg.startswith("config key 'model.path' is still the placeholder '<your HF model folder>'"), msg
    assert "data.tasks[0].name" in _err(paper, ["model.path=/models/m"])
    cfg = load_config(paper, ["model.path=/models/m", "data.tasks=[{name: gsm8k, train: t.jsonl, val: v.jsonl}]"])
    t, m = cfg.train, cfg.msft
    assert (t.lr, t.schedule, t.warmup_steps, t.weight_decay, cfg.data.max_seq_len) == (1e-5, "constant", 0, 0.0, 512)
    assert 8 * t.grad_accum * cfg.data.tokens_per_batch == 64 * 512  # about 64 sequences per step on 8 GPUs
    assert (m.budget_epochs, m.evals_per_epoch, m.max_stages, m.max_epochs) == (10, 4, 10, float("inf"))
    assert (m.metric, m.answer_pattern, m.restore, m.min_delta) == ("val_exact_match", r"####\s*(.+)", "weights", 0)


def test_every_attention_backend_the_model_module_offers_is_a_valid_config_value(cfg_file):
    from msft_fast.model import ATTENTION_BACKENDS

    for name in ["auto"] + [b.name for b in ATTENTION_BACKENDS]:
        assert load_config(cfg_file, [f"model.attn_implementation={name}"]).model.attn_implementation == name


def test_an_unknown_attention_backend_names_the_key(cfg_file):
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        load_config(cfg_file, ["model.attn_implementation=dense"])


def test_ies_and_dynamix_keys(cfg_file):
    cfg = load_config(cfg_file, ["method=ies"])
    assert (cfg.method, cfg.ies.threshold, cfg.ies.window, cfg.ies.k) == ("ies", 1e-3, 3, 1)
    cfg = load_config(cfg_file, ["method=dynamix", "dynamix.update_every=10"])
    assert (cfg.dynamix.beta, cfg.dynamix.gamma, cfg.dynamix.alpha, cfg.dynamix.update_every) == (4.0, 0.3, 0.95, 10)
    for bad in ("ies.threshold=0", "ies.threshold=nan", "ies.window=0", "ies.k=0", "dynamix.beta=-1",
                "dynamix.gamma=1.5", "dynamix.alpha=1", "dynamix.update_every=0", "dynamix.epsilon=0"):
        assert bad.split("=")[0] in _err(cfg_file, [bad]), bad
    assert "ies.treshold" in _err(cfg_file, ["ies.treshold=0.1"])  # a misspelt key is named
