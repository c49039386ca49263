"""Hub names: model.path and a task's train/val given as repo ids resolve through huggingface_hub's
cache (laid out here by hand, offline: HF_HUB_OFFLINE=1 as in every test), pinned to one commit,
with errors that name the config key and the repo."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from hub_cache import commit_of, folder_files, parquet_bytes, put_repo, toy_dataset_files, toy_rows

from msft_fast import hub
from msft_fast.config import Config, DataConfig, ModelConfig, TaskConfig, load_config
from msft_fast.data.formats import RowEncoder
from msft_fast.data.tasks import load_tasks
from msft_fast.errors import ConfigError, DataError, ModelError

CPU = torch.device("cpu")
MAIN, TAGGED = commit_of("main"), commit_of("v2")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache of this test's own (huggingface_hub reads HF_HUB_CACHE when imported)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert hub.is_offline()  # conftest: no test may reach the network
    return cache


def _saved_model(tmp_path, tokenizer, seed: int, name: str, **save):
    folder = tmp_path / name
    tiny_llama(tokenizer, seed=seed).save_pretrained(folder, **save)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def hub_models(tmp_path, hub_cache, tokenizer):
    """org/tiny: main at one commit (seed 1), tag v2 at another (seed 2); the Hub's usual extras
    (README, a sub-folder with other weights) beside the files from_pretrained reads."""
    extras = {"README.md": b"# tiny\n", "original/consolidated.safetensors": b"not read"}
    a = put_repo(hub_cache, "org/tiny", {**folder_files(_saved_model(tmp_path, tokenizer, 1, "a")), **extras}, MAIN)
    b = put_repo(hub_cache, "org/tiny", folder_files(_saved_model(tmp_path, tokenizer, 2, "b")), TAGGED, refs=("v2",))
    return a, b


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.stack
def test_a_hub_model_id_loads_from_its_cached_snapshot(hub_models, tokenizer):
    from msft_fast.model import load_model, load_model_spec

    snapshot, _ = hub_models
    spec = load_model_spec(ModelConfig(path="org/tiny"), "fp32", CPU)
    assert (spec.source, spec.path, spec.commit) == ("org/tiny", str(snapshot), MAIN)
    loaded = load_model(ModelConfig(path="org/tiny"), "fp32", CPU, seed=0, spec=spec)
    expected = _weights(tiny_llama(tokenizer, seed=1))
    got = _weights(loaded.model)
    assert loaded.source == "org/tiny" and got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("revision, commit, seed", [("v2", TAGGED, 2), (MAIN, MAIN, 1), (None, MAIN, 1)])
def test_model_revision_is_a_branch_tag_or_commit(hub_models, tokenizer, revision, commit, seed):
    from msft_fast.model import load_model

    cfg = ModelConfig(path="org/tiny", revision=revision)
    assert hub.pin_commits(Config("o", model=cfg)) == {"model.path": commit}
    loaded = load_model(cfg, "fp32", CPU, seed=0)
    reference = tiny_llama(tokenizer, seed=seed).model.embed_tokens.weight
    assert torch.equal(loaded.model.model.embed_tokens.weight, reference)


def test_a_resumed_run_keeps_the_commit_it_started_from(hub_models, tmp_path):
    from msft_fast.run import _resumed_commits

    cfg = Config("o", model=ModelConfig(path="org/tiny"))
    checkpoint = tmp_path / "step-00000004"
    checkpoint.mkdir()
    (checkpoint / "history.json").write_text(json.dumps({"hub_commits": {"model.path": TAGGED}}))
    # main points at MAIN now, but the run began at TAGGED: it goes on reading TAGGED.
    assert hub.pin_commits(cfg, _resumed_commits(str(checkpoint))) == {"model.path": TAGGED}
    assert hub.pin_commits(cfg, _resumed_commits(None)) == {"model.path": MAIN}


def test_offline_and_not_cached_is_one_line_naming_the_key_and_the_repo(hub_cache, tmp_path, capsys, demo_dir):
    from msft_fast.cli import main

    task = f"{{name: upper, train: {demo_dir / 'upper' / 'train.jsonl'}, val_fraction: 0.2}}"
    base = [f"output_dir={tmp_path / 'run'}", f"data.tasks=[{task}]", "train.progress=false"]
    assert main(["train", *base, "model.path=org/absent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (f"msft-fast: error: config key 'model.path': 'org/absent' is not a local path, the Hub model "
                      f"'org/absent' (revision main) is not in the local Hub cache ({hub_cache}), and HF_HUB_OFFLINE=1 "
                      "forbids downloading it: download it where the Hub can be reached (`hf download org/absent`) "
                      "or unset HF_HUB_OFFLINE")
    assert main(["train", *base, "model.path=org/absent", "model.revision=v9"]) == 2
    assert "the Hub model 'org/absent' (revision v9) is not in the local Hub cache" in capsys.readouterr().err


def test_an_incomplete_cached_snapshot_names_the_missing_shard(tmp_path, hub_cache, tokenizer):
    from msft_fast.model import load_model_spec

    folder = _saved_model(tmp_path, tokenizer, 1, "sharded", max_shard_size="20KB")
    files = folder_files(folder)
    shards = sorted(n for n in files if n.startswith("model-"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in files
    del files[shards[-1]]
    put_repo(hub_cache, "org/sharded", files, MAIN)
    with pytest.raises(ModelError, match=f"^config key 'model.path': the cached snapshot of the Hub model "
                                         f"'org/sharded' \\(revision main\\) in .* lacks {shards[-1]}; "
                                         "download it again"):
        load_model_spec(ModelConfig(path="org/sharded"), "fp32", CPU)


def test_a_local_folder_wins_over_a_repo_id_of_the_same_name(hub_models, tmp_path, tokenizer, monkeypatch):
    from msft_fast.model import load_model_spec

    monkeypatch.chdir(tmp_path)
    _saved_model(tmp_path / "org", tokenizer, 3, "tiny")  # ./org/tiny, as from_pretrained looks first
    spec = load_model_spec(ModelConfig(path="org/tiny"), "fp32", CPU)
    assert spec.path == str(tmp_path / "org" / "tiny") and spec.commit is None
    with pytest.raises(ConfigError, match="^config key 'model.revision' \\(v2\\) applies to a Hub model, but "
                                          "model.path org/tiny is a local path$"):
        load_model_spec(ModelConfig(path="org/tiny", revision="v2"), "fp32", CPU)


@pytest.mark.parametrize("path, repo", [
    ("org/name", "org/name"), ("gpt2", "gpt2"), ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ("/abs/org/name", None), ("./org/name", None), ("~/models/x", None), ("a/b/c", None),
    ("data/train.jsonl", None), ("org--x/name", None), ("org/na..me", None), ("builtin:tiny-llama", None),
])
def test_what_counts_as_a_repo_id(path, repo):
    assert hub.hub_repo_id(path) == repo


def test_model_files_are_those_from_pretrained_reads():
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "model.safetensors", "consolidated.safetensors", "pytorch_model.bin", "README.md", ".gitattributes",
             "original/params.json", "original/consolidated.00.pth"]
    assert hub.model_files(names, read_index=None) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    sharded = ["config.json", "tokenizer.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    assert hub.model_files(sharded, read_index=lambda name: index if name.startswith("model.") else {}) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "pytorch_model.bin.index.json", "tokenizer.json"]
    assert hub.model_files(["config.json", "pytorch_model.bin", "vocab.json"], read_index=None) == [
        "config.json", "pytorch_model.bin", "vocab.json"]


# ---------------------------------------------------------------------------------------------
# Datasets


def _task(**kw) -> TaskConfig:
    return TaskConfig(**{"name": "toy", "columns": {"prompt": "question", "completion": "answer"}, **kw})


def _load(tmp_path, tokenizer, *tasks, commits=None):
    cfg = DataConfig(tasks=list(tasks), max_seq_len=64, tokens_per_batch=512, cache_dir=str(tmp_path / "cache"))
    return load_tasks(cfg, tokenizer, commits)


def _encoded(tokenizer, rows):
    enc = RowEncoder(tokenizer, "prompt_completion")
    return [enc.encode({"prompt": r["question"], "completion": r["answer"]})[0] for r in rows]


def _docs(docset):
    return [docset.input_ids[s: s + n].tolist() for s, n in zip(docset.starts, docset.lengths)]


@pytest.fixture
def toy_repo_folder(tmp_path):
    """A dataset repo laid out locally, as `git clone` of a Hub dataset gives it."""
    folder = tmp_path / "toy_repo"
    for name, data in toy_dataset_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_a_dataset_repo_folder_reads_its_readme_configs_and_splits(tmp_path, tokenizer, toy_repo_folder):
    (t,) = _load(tmp_path, tokenizer, _task(train=str(toy_repo_folder), config="main", val_split="test"))
    assert _docs(t.train) == _encoded(tokenizer, toy_rows("train", 12))
    assert _docs(t.val) == _encoded(tokenizer, toy_rows("test", 4))
    assert t.counts["train_rows"] == 12 and t.counts["val_rows"] == 4 and "val_held_out" not in t.counts
    (t,) = _load(tmp_path, tokenizer, _task(train=str(toy_repo_folder), config="main", split="train[:5]",
                                            val_fraction=0.2))
    assert t.counts["train_rows"] == 5 and len(t.val) == 1


@pytest.mark.stack
def test_a_hub_dataset_id_reads_the_hub_cache_offline(tmp_path, hub_cache, tokenizer):
    put_repo(hub_cache, "org/toy", toy_dataset_files(), MAIN, repo_type="dataset")
    put_repo(hub_cache, "org/toy", toy_dataset_files(train=6), TAGGED, refs=("v2",), repo_type="dataset")
    (t,) = _load(tmp_path, tokenizer, _task(train="org/toy", config="main", val_split="test"))
    assert _docs(t.train) == _encoded(tokenizer, toy_rows("train", 12))
    assert _docs(t.val) == _encoded(tokenizer, toy_rows("test", 4))
    assert t.sources == {
        "train": {"dataset": "org/toy", "split": "train", "config": "main", "revision": "main", "commit": MAIN},
        "val": {"dataset": "org/toy", "split": "test", "config": "main", "revision": "main", "commit": MAIN}}
    (t,) = _load(tmp_path, tokenizer, _task(train="org/toy", config="main", val_split="test", revision="v2"))
    assert t.counts["train_rows"] == 6 and t.sources["train"]["commit"] == TAGGED
    # A separate validation dataset, read at its own pinned commit.
    put_repo(hub_cache, "org/toy-eval", {"data/train-0.parquet": parquet_bytes(toy_rows("test", 3))}, MAIN,
             repo_type="dataset")
    (t,) = _load(tmp_path, tokenizer, _task(train="org/toy", config="main", val="org/toy-eval"))
    assert _docs(t.val) == _encoded(tokenizer, toy_rows("test", 3))


@pytest.mark.parametrize("task, says", [
    (dict(config="main", val_split="validation"), "(config key 'data.tasks[0].val_split')"),
    (dict(config="nope", val_split="test"), "(config key 'data.tasks[0].config')"),
    (dict(val_split="test"), "(config key 'data.tasks[0].config')"),  # two configs, none chosen
    (dict(config="main", split="dev", val_fraction=0.2), "(config key 'data.tasks[0].split')"),
    (dict(config="main", val_split="test", columns={"prompt": "q", "completion": "answer"}),
     "has no column 'q' (config key 'data.tasks[0].columns.prompt'); its columns: answer, question"),
])
def test_dataset_errors_name_the_task_and_the_key(tmp_path, hub_cache, tokenizer, task, says):
    put_repo(hub_cache, "org/toy", toy_dataset_files(), MAIN, repo_type="dataset")
    with pytest.raises(DataError) as e:
        _load(tmp_path, tokenizer, _task(train="org/toy", **task))
    assert str(e.value).startswith("task 'toy': ") and says in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_an_uncached_dataset_offline_and_keys_that_mean_nothing(tmp_path, hub_cache, tokenizer, demo_dir):
    with pytest.raises(DataError, match="^task 'toy' \\(config key 'data.tasks\\[0\\].train'\\): 'org/absent' is not "
                                        "a local path, the Hub dataset 'org/absent' \\(revision main\\) is not in the "
                                        "local Hub cache .*`hf download --repo-type dataset org/absent`"):
        _load(tmp_path, tokenizer, _task(train="org/absent", val_split="test"))
    jsonl = str(demo_dir / "upper" / "train.jsonl")
    with pytest.raises(ConfigError, match="^config key 'data.tasks\\[0\\].revision' \\(v2\\) applies to a Hub dataset"):
        _load(tmp_path, tokenizer, TaskConfig("toy", jsonl, val_fraction=0.2, revision="v2"))
    with pytest.raises(ConfigError, match="^config key 'data.tasks\\[0\\].config' \\(main\\) applies to a Hub dataset"):
        _load(tmp_path, tokenizer, TaskConfig("toy", jsonl, val_fraction=0.2, config="main"))
    with pytest.raises(DataError, match="has only the split 'train' \\(a single file\\), so "
                                        "data.tasks\\[0\\].val_split \\(test\\) cannot be read from it"):
        _load(tmp_path, tokenizer, TaskConfig("toy", jsonl, val_split="test"))


def test_the_tokenization_cache_key_holds_the_dataset_id_config_split_revision_and_commit(
        tmp_path, tokenizer, toy_repo_folder, monkeypatch):
    """Same rows, same files: only the source's description differs, and each part must change the key."""
    import datasets

    keys = []
    original = datasets.Dataset.map

    def spy(self, *args, new_fingerprint=None, **kwargs):
        keys.append(new_fingerprint)
        return original(self, *args, new_fingerprint=new_fingerprint, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    task = _task(train=str(toy_repo_folder), config="main", val_split="test")
    from msft_fast.data import tasks as tasks_mod

    base = tasks_mod.task_source(task, 0, "train", None)
    variants = [base, *(tasks_mod.DataSource(**{**base.__dict__, field: value}) for field, value in (
        ("name", "org/toy"), ("config", "main2"), ("split", "train[:100%]"), ("commit", MAIN)))]
    source = hub.HubSource("org/toy", "dataset", "v2", "w", "k")
    variants.append(tasks_mod.DataSource(**{**base.__dict__, "hub": source, "commit": MAIN}))
    raw, _ = tasks_mod._read_rows(base, str(tmp_path / "cache"), "w")
    monkeypatch.setattr(tasks_mod, "_read_rows", lambda *a: (raw, False))
    for src in variants:
        tasks_mod._tokenize_source(task, src, DataConfig(max_seq_len=64, tokens_per_batch=512), tokenizer, "tok")
    assert len(keys) == len(variants) == len(set(keys))
    assert [base.fingerprint(), variants[-1].fingerprint()] == [
        [str(toy_repo_folder), "main", "train", None, None], [str(toy_repo_folder), "main", "train", "v2", MAIN]]


def test_val_split_is_one_way_to_give_validation_rows():
    def cfg(**task):
        tasks = json.dumps([{"name": "t", "train": "org/x", **task}])
        return load_config(None, ["output_dir=o", f"data.tasks={tasks}"])

    assert cfg(val_split="test").data.tasks[0].val_split == "test"
    assert cfg(val="org/y", val_split="dev").data.tasks[0].val == "org/y"
    for bad in (dict(val_split="test", val_fraction=0.1), dict()):
        with pytest.raises(ConfigError, match="needs exactly one of 'val' or 'val_fraction' \\('val_split' counts"):
            cfg(**bad)
    with pytest.raises(ConfigError, match="config key 'data.tasks\\[0\\].columns' must be a mapping from messages, "
                                          "prompt, completion, text to column names"):
        cfg(val_split="test", columns={"question": "prompt"})
