"""Task loading: files -> tokenized, cached, split DocSets with row counts; DataErrors name the file/row."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import write_jsonl

from msft_fast.config import DataConfig, TaskConfig
from msft_fast.data import tasks as tasks_mod
from msft_fast.data.formats import IGNORE_INDEX, RowEncoder, labels_from_mask
from msft_fast.data.tasks import DocSet, load_tasks
from msft_fast.errors import DataError


def _data_cfg(tmp_path, tasks, **kw) -> DataConfig:
    kw.setdefault("max_seq_len", 256)
    kw.setdefault("tokens_per_batch", max(1024, kw["max_seq_len"]))
    return DataConfig(tasks=tasks, cache_dir=str(tmp_path / "cache"), **kw)


def _chat_rows(n, offset=0):
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer."},
                {"role": "user", "content": f"what is {i} + 1?"},
                {"role": "assistant", "content": f"{i + 1}"},
            ]
        }
        for i in range(offset, offset + n)
    ]


def _pc_rows(n, offset=0):
    return [{"prompt": f"reverse {i}x: ", "completion": f"x{i}"[::-1]} for i in range(offset, offset + n)]


def _docs(ds: DocSet) -> list[tuple[list[int], list[int]]]:
    return [
        (ds.input_ids[s : s + n].tolist(), ds.labels[s : s + n].tolist()) for s, n in zip(ds.starts, ds.lengths)
    ]


def _check_docset(ds: DocSet) -> None:
    assert ds.input_ids.dtype == np.int32 and ds.labels.dtype == np.int32
    assert len(ds.input_ids) == len(ds.labels)
    assert len(ds.starts) == len(ds.lengths) == len(ds.loss_tokens) == len(ds)
    assert (ds.starts >= 0).all() and (ds.lengths >= 1).all()
    assert (ds.starts + ds.lengths <= len(ds.input_ids)).all()
    for d, (ids, labels) in enumerate(_docs(ds)):
        assert labels[-1] == IGNORE_INDEX
        for i in range(len(ids) - 1):
            assert labels[i] in (IGNORE_INDEX, ids[i + 1])
        assert ds.loss_tokens[d] == sum(lab != IGNORE_INDEX for lab in labels) > 0


def _err(cfg, tokenizer) -> str:
    with pytest.raises(DataError) as info:
        load_tasks(cfg, tokenizer)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.stack
def test_load_chat_and_prompt_completion_tasks(tmp_path, tokenizer):
    chat_train, chat_val = _chat_rows(6), _chat_rows(2, offset=100)
    pc_train, pc_val = _pc_rows(5), _pc_rows(3, offset=50)
    tasks = [
        TaskConfig("chat", write_jsonl(tmp_path / "chat/train.jsonl", chat_train),
                   val=write_jsonl(tmp_path / "chat/val.jsonl", chat_val)),
        TaskConfig("pc", write_jsonl(tmp_path / "pc/train.jsonl", pc_train),
                   val=write_jsonl(tmp_path / "pc/val.jsonl", pc_val)),
    ]
    out = load_tasks(_data_cfg(tmp_path, tasks), tokenizer)
    assert [(t.name, t.task_id) for t in out] == [("chat", 0), ("pc", 1)]
    expected = {
        ("chat", "train"): (chat_train, "messages"),
        ("chat", "val"): (chat_val, "messages"),
        ("pc", "train"): (pc_train, "prompt_completion"),
        ("pc", "val"): (pc_val, "prompt_completion"),
    }
    for t in out:
        for split in ("train", "val"):
            ds = getattr(t, split)
            _check_docset(ds)
            rows, fmt = expected[(t.name, split)]
            assert len(ds) == len(rows)
            enc = RowEncoder(tokenizer, fmt)
            for (ids, labels), row in zip(_docs(ds), rows):  # in file order
                want_ids, want_mask = enc.encode(row)
                assert ids == want_ids
                assert labels == labels_from_mask(want_ids, want_mask)
            assert t.counts[f"{split}_rows"] == len(rows)
            assert t.counts[f"{split}_truncated"] == 0
            assert t.counts[f"{split}_dropped_overlong"] == 0
            assert t.counts[f"{split}_dropped_no_trained_tokens"] == 0
    # chat: trained tokens are the assistant answer plus <|end|>
    chat_train_ds = out[0].train
    assert chat_train_ds.loss_tokens.tolist() == [len(str(i + 1)) + 1 for i in range(6)]
    # prompt/completion: completion plus EOS
    assert out[1].train.loss_tokens.tolist() == [len(r["completion"]) + 1 for r in pc_train]


def test_demo_mixture_loads(demo_dir, tmp_path, tokenizer):
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    tasks = [TaskConfig(e["name"], str(demo_dir / e["train"]), val=str(demo_dir / e["val"])) for e in manifest["tasks"]]
    out = load_tasks(_data_cfg(tmp_path, tasks, max_seq_len=128), tokenizer)
    assert [t.name for t in out] == [e["name"] for e in manifest["tasks"]]
    for t, e in zip(out, manifest["tasks"]):
        for split in ("train", "val"):
            rows = manifest["files"][f"{e['name']}/{split}.jsonl"]["rows"]
            assert t.counts[f"{split}_rows"] == rows
            assert len(getattr(t, split)) == rows  # every demo row fits and trains
        _check_docset(t.train)
        _check_docset(t.val)


def test_forced_format_overrides_detection(tmp_path, tokenizer):
    rows = [{"text": f"line {i}", "prompt": "p", "completion": "c"} for i in range(4)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    out = load_tasks(_data_cfg(tmp_path, [TaskConfig("t", path, val=path, format="text")]), tokenizer)
    ids, labels = _docs(out[0].train)[0]
    assert tokenizer.decode(ids) == "<s>line 0</s>"
    assert out[0].train.loss_tokens[0] == len(ids) - 1  # text: every token but the first is a target


# ---------------------------------------------------------------------------------------------
# val_fraction


def test_val_fraction_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "all.jsonl", _pc_rows(20))

    def load(seed):
        cfg = _data_cfg(tmp_path, [TaskConfig("t", path, val_fraction=0.25)], split_seed=seed)
        (t,) = load_tasks(cfg, tokenizer)
        return t

    t = load(0)
    assert len(t.val) == 5 and len(t.train) == 15
    assert t.counts["train_rows"] == 20
    # The held-out rows are counted too (issue 19): there is no validation file, so no val_rows.
    assert (t.counts["val_held_out"], t.counts["val_docs"], t.counts["train_docs"]) == (5, 5, 15)
    assert "val_rows" not in t.counts
    train_starts, val_starts = set(t.train.starts.tolist()), set(t.val.starts.tolist())
    assert not train_starts & val_starts
    assert len(train_starts | val_starts) == 20
    assert t.train.input_ids is t.val.input_ids  # views of one tokenization
    _check_docset(t.train)
    _check_docset(t.val)

    again = load(0)
    assert again.val.starts.tolist() == t.val.starts.tolist()
    assert again.train.starts.tolist() == t.train.starts.tolist()
    other = load(1)
    assert len(other.val) == 5
    assert other.val.starts.tolist() != t.val.starts.tolist()


def test_val_fraction_keeps_at_least_one_each_side(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "few.jsonl", _pc_rows(3))
    (t,) = load_tasks(_data_cfg(tmp_path, [TaskConfig("t", path, val_fraction=0.01)]), tokenizer)
    assert (len(t.train), len(t.val)) == (2, 1)
    (t,) = load_tasks(_data_cfg(tmp_path, [TaskConfig("t", path, val_fraction=0.99)]), tokenizer)
    assert (len(t.train), len(t.val)) == (1, 2)


def test_val_fraction_single_row_is_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", _pc_rows(1))
    msg = _err(_data_cfg(tmp_path, [TaskConfig("solo", path, val_fraction=0.5)]), tokenizer)
    assert "'solo'" in msg and "empty validation split" in msg and path in msg


# ---------------------------------------------------------------------------------------------
# Over-long rows


def _overlong_task(tmp_path):
    max_len = 16
    rows = [
        {"prompt": "ab", "completion": "cd"},  # 6 tokens: fits
        {"prompt": "p" * 5, "completion": "c" * 20},  # 27 tokens: over-long, completion partly kept
        {"prompt": "q" * 40, "completion": "z"},  # over-long, only prompt survives truncation
        {"prompt": "r" * (max_len - 1), "completion": "z"},  # BOS + prompt == max_len exactly
        {"prompt": "s" * (max_len - 2), "completion": "z"},  # one completion token survives
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    val = write_jsonl(tmp_path / "long_val.jsonl", rows[:1])
    return max_len, rows, path, val


def test_overlong_truncate(tmp_path, tokenizer):
    max_len, rows, path, val = _overlong_task(tmp_path)
    (t,) = load_tasks(_data_cfg(tmp_path, [TaskConfig("t", path, val=val)], max_seq_len=max_len), tokenizer)
    assert t.counts["train_rows"] == 5
    assert t.counts["train_truncated"] == 2  # rows 2 and 5 are cut and kept
    assert t.counts["train_dropped_no_trained_tokens"] == 2  # rows 3 and 4
    assert t.counts["train_dropped_overlong"] == 0
    docs = _docs(t.train)
    assert [len(ids) for ids, _ in docs] == [6, max_len, max_len]
    _check_docset(t.train)
    ids, labels = docs[1]
    full_ids, _ = RowEncoder(tokenizer, "prompt_completion").encode(rows[1])
    assert ids == full_ids[:max_len]
    assert labels[-1] == IGNORE_INDEX  # the cut end predicts nothing
    assert t.train.loss_tokens.tolist() == [3, max_len - 6, 1]


def test_overlong_drop(tmp_path, tokenizer):
    max_len, rows, path, val = _overlong_task(tmp_path)
    cfg = _data_cfg(tmp_path, [TaskConfig("t", path, val=val)], max_seq_len=max_len, overlong="drop")
    (t,) = load_tasks(cfg, tokenizer)
    assert t.counts["train_rows"] == 5
    assert t.counts["train_dropped_overlong"] == 4
    assert t.counts["train_truncated"] == 0
    assert t.counts["train_dropped_no_trained_tokens"] == 0
    assert len(t.train) == 1 and t.train.lengths.tolist() == [6]
    _check_docset(t.train)


def test_row_that_fits_exactly_is_kept(tmp_path, tokenizer):
    rows = [{"prompt": "abc", "completion": "de"}]  # BOS + 5 + EOS = 7 tokens
    path = write_jsonl(tmp_path / "fit.jsonl", rows)
    (t,) = load_tasks(_data_cfg(tmp_path, [TaskConfig("t", path, val=path)], max_seq_len=7, overlong="drop"),
                      tokenizer)
    assert t.train.lengths.tolist() == [7]
    assert t.counts["train_dropped_overlong"] == 0 and t.counts["train_truncated"] == 0


def test_every_row_overlong_is_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a" * 30, "completion": "b" * 30}] * 3)
    val = write_jsonl(tmp_path / "val.jsonl", _pc_rows(2))
    cfg = _data_cfg(tmp_path, [TaskConfig("longs", path, val=val)], max_seq_len=16, overlong="drop")
    msg = _err(cfg, tokenizer)
    assert "'longs'" in msg and "no usable training rows" in msg and path in msg
    assert "dropped_overlong: 3" in msg and "data.max_seq_len" in msg


def test_validation_all_dropped_is_error(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", _pc_rows(3))
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "a" * 30, "completion": "b"}])
    cfg = _data_cfg(tmp_path, [TaskConfig("v", train, val=val)], max_seq_len=16, overlong="drop")
    msg = _err(cfg, tokenizer)
    assert "'v'" in msg and "empty validation split" in msg and val in msg


# ---------------------------------------------------------------------------------------------
# Caching


@pytest.mark.stack
def test_tokenization_is_cached(tmp_path, tokenizer, monkeypatch):
    calls = {"n": 0}
    original = RowEncoder.encode

    def counting(self, row):
        calls["n"] += 1
        return original(self, row)

    monkeypatch.setattr(tasks_mod.RowEncoder, "encode", counting)
    train = write_jsonl(tmp_path / "train.jsonl", _chat_rows(7))
    val = write_jsonl(tmp_path / "val.jsonl", _chat_rows(2, offset=9))
    tasks = [TaskConfig("c", train, val=val)]

    first = load_tasks(_data_cfg(tmp_path, tasks, max_seq_len=64), tokenizer)
    assert calls["n"] == 9
    second = load_tasks(_data_cfg(tmp_path, tasks, max_seq_len=64), tokenizer)
    assert calls["n"] == 9, "second load re-tokenized instead of using the cache"
    assert second[0].counts == first[0].counts
    assert _docs(second[0].train) == _docs(first[0].train)
    assert _docs(second[0].val) == _docs(first[0].val)

    third = load_tasks(_data_cfg(tmp_path, tasks, max_seq_len=32), tokenizer)
    assert calls["n"] == 18, "changing max_seq_len must re-tokenize"
    assert _docs(third[0].train) == _docs(first[0].train)  # all rows are short either way

    load_tasks(_data_cfg(tmp_path, tasks, max_seq_len=64, overlong="drop"), tokenizer)
    assert calls["n"] == 27, "changing the over-long policy must re-tokenize"


def test_cache_not_reused_when_file_changes(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, _pc_rows(3))
    cfg = _data_cfg(tmp_path, [TaskConfig("t", str(path), val=str(path))])
    (a,) = load_tasks(cfg, tokenizer)
    write_jsonl(path, _pc_rows(3, offset=500))
    (b,) = load_tasks(cfg, tokenizer)
    assert _docs(a.train) != _docs(b.train)
    want = [RowEncoder(tokenizer, "prompt_completion").encode(r)[0] for r in _pc_rows(3, offset=500)]
    assert [ids for ids, _ in _docs(b.train)] == want


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_json_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [_pc_rows(1)[0], _pc_rows(1)[0], '{"prompt": "a", "completion"'])
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", path, val=path)]), tokenizer)
    assert path in msg and "line 3" in msg and "not valid JSON" in msg


def test_json_line_not_an_object(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "arr.jsonl", [_pc_rows(1)[0], "[1, 2]"])
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", path, val=path)]), tokenizer)
    assert path in msg and "line 2" in msg


def test_row_missing_completion(tmp_path, tokenizer):
    rows = _pc_rows(3)
    del rows[1]["completion"]
    path = write_jsonl(tmp_path / "missing.jsonl", rows)
    msg = _err(_data_cfg(tmp_path, [TaskConfig("pc", path, val=path)]), tokenizer)
    assert "'pc'" in msg and path in msg and "row 2" in msg and "completion" in msg


def test_missing_file(tmp_path, tokenizer):
    path = str(tmp_path / "nope.jsonl")
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", path, val=path)]), tokenizer)
    assert path in msg and "does not exist" in msg


def test_missing_val_file(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", _pc_rows(2))
    val = str(tmp_path / "val.jsonl")
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", train, val=val)]), tokenizer)
    assert val in msg and "does not exist" in msg
    assert "task 't': validation file" in msg and "config key 'data.tasks[0].val'" in msg


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")])
def test_empty_train_file(tmp_path, tokenizer, name, content):
    path = tmp_path / name
    path.write_text(content)
    val = write_jsonl(tmp_path / "val.jsonl", _pc_rows(2))
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", str(path), val=val)]), tokenizer)
    assert str(path) in msg and "has no rows" in msg


def test_empty_val_file(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", _pc_rows(2))
    val = tmp_path / "val.jsonl"
    val.write_text("")
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", train, val=str(val))]), tokenizer)
    assert str(val) in msg and "has no rows" in msg and "task 't': validation file" in msg


def test_empty_saved_dataset(tmp_path, tokenizer):
    import datasets

    folder = str(tmp_path / "empty_ds")
    datasets.Dataset.from_dict({"text": []}).save_to_disk(folder)
    val = write_jsonl(tmp_path / "val.jsonl", _pc_rows(2))
    msg = _err(_data_cfg(tmp_path, [TaskConfig("nil", folder, val=val)]), tokenizer)
    assert folder in msg  # datasets cannot even reload an empty saved dataset; still one DataError


def test_json_array_file(tmp_path, tokenizer):
    rows = _pc_rows(3)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=1))
    (t,) = load_tasks(_data_cfg(tmp_path, [TaskConfig("arr", str(path), val=str(path))]), tokenizer)
    enc = RowEncoder(tokenizer, "prompt_completion")
    assert [ids for ids, _ in _docs(t.train)] == [enc.encode(r)[0] for r in rows]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows, indent=1)[:-3] + "\n,,]")
    msg = _err(_data_cfg(tmp_path, [TaskConfig("arr", str(bad), val=str(bad))]), tokenizer)
    assert str(bad) in msg and "is not valid JSON" in msg and "line " in msg


def test_unknown_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    msg = _err(_data_cfg(tmp_path, [TaskConfig("qa", path, val=path)]), tokenizer)
    assert "'qa'" in msg and path in msg and "cannot tell the format" in msg


def test_unsupported_extension(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\na,b\n")
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", str(path), val=str(path))]), tokenizer)
    assert str(path) in msg and "unsupported extension '.csv'" in msg


def test_folder_that_is_not_a_dataset(tmp_path, tokenizer):
    folder = tmp_path / "notads"
    folder.mkdir()
    # A folder of .txt/.jsonl/.parquet files is a dataset repo that load_dataset reads; this one holds none.
    (folder / "x.bin").write_bytes(b"\x00\x01")
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", str(folder), val=str(folder))]), tokenizer)
    assert str(folder) in msg and "neither a saved HF dataset folder" in msg


# ---------------------------------------------------------------------------------------------
# Other file types


@pytest.mark.stack
def test_parquet(tmp_path, tokenizer):
    import datasets

    rows = _pc_rows(4)
    path = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    (t,) = load_tasks(_data_cfg(tmp_path, [TaskConfig("pq", path, val=path)]), tokenizer)
    enc = RowEncoder(tokenizer, "prompt_completion")
    assert [ids for ids, _ in _docs(t.train)] == [enc.encode(r)[0] for r in rows]
    assert t.counts["train_rows"] == 4 and t.counts["val_rows"] == 4
    _check_docset(t.train)


@pytest.mark.stack
def test_saved_dataset_folder(tmp_path, tokenizer):
    import datasets

    rows = _chat_rows(4)
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows).save_to_disk(folder)
    dd_folder = str(tmp_path / "saved_dict")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_chat_rows(2, offset=20))}).save_to_disk(dd_folder)
    (t,) = load_tasks(_data_cfg(tmp_path, [TaskConfig("disk", folder, val=dd_folder)]), tokenizer)
    enc = RowEncoder(tokenizer, "messages")
    assert [ids for ids, _ in _docs(t.train)] == [enc.encode(r)[0] for r in rows]
    assert [ids for ids, _ in _docs(t.val)] == [enc.encode(r)[0] for r in _chat_rows(2, offset=20)]
    _check_docset(t.train)
    _check_docset(t.val)


def test_saved_dataset_dict_without_train_split(tmp_path, tokenizer):
    import datasets

    folder = str(tmp_path / "dd")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(_pc_rows(2))}).save_to_disk(folder)
    msg = _err(_data_cfg(tmp_path, [TaskConfig("t", folder, val=folder)]), tokenizer)
    assert folder in msg and "test" in msg


def test_a_docset_digest_follows_the_documents_not_the_storage(monkeypatch):
    """DocSet.digest (what a resume compares): the same documents hash alike however they are stored
    and sliced for hashing; a changed token, label or boundary changes it."""
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, 50, 40).astype(np.int32), rng.integers(-100, 50, 40).astype(np.int32)
    docs = DocSet(ids, labels, np.array([30, 0, 12, 5]), np.array([7, 5, 9, 4]), np.ones(4, np.int64))
    digest = docs.digest()
    # The same documents laid out contiguously, in order.
    order = np.concatenate([np.arange(s, s + n) for s, n in zip(docs.starts, docs.lengths)])
    packed = DocSet(ids[order], labels[order], np.array([0, 7, 12, 21]), docs.lengths, docs.loss_tokens)
    assert packed.digest() == digest
    for per_slice in (1, 3):
        monkeypatch.setattr(tasks_mod, "DIGEST_DOCS", per_slice)
        assert docs.digest() == digest
    changed = labels.copy()
    changed[13] += 1  # inside the third document
    assert DocSet(ids, changed, docs.starts, docs.lengths, docs.loss_tokens).digest() != digest
    assert DocSet(ids, labels, docs.starts, np.array([7, 5, 8, 4]), docs.loss_tokens).digest() != digest
    assert docs.subset(np.array([1, 0, 2, 3])).digest() != digest  # another order
