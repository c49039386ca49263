"""What each task contributes, counted per split in history.json `data`, and what a user must hear
about: rows lost to data.max_seq_len, rows truncated, characters the tokenizer cannot encode."""
from __future__ import annotations

import pytest
from conftest import write_jsonl

from msft_fast.config import DataConfig, TaskConfig
from msft_fast.data.tasks import data_warnings, load_tasks


def _pc(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"q{i}: ", "completion": f"a{i}"} for i in range(offset, offset + n)]


def _load(tmp_path, tokenizer, tasks, **data):
    cfg = DataConfig(tasks=tasks, max_seq_len=32, tokens_per_batch=64, cache_dir=str(tmp_path / "cache"), **data)
    return cfg, load_tasks(cfg, tokenizer)


def test_counts_hold_both_splits_also_for_val_fraction(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", _pc(30))
    val = write_jsonl(tmp_path / "v.jsonl", _pc(4, 100))
    _, (held, given) = _load(tmp_path, tokenizer, [TaskConfig("held", train, val_fraction=0.1),
                                                   TaskConfig("given", train, val=val)])
    assert held.counts["train_rows"] == 30
    assert held.counts["val_held_out"] == held.counts["val_docs"] == len(held.val) == 3
    assert held.counts["train_docs"] == len(held.train) == 27
    assert given.counts["val_rows"] == given.counts["val_docs"] == 4 and given.counts["train_docs"] == 30
    assert "val_held_out" not in given.counts


def test_rows_lost_to_max_seq_len_and_unencodable_characters_are_warned(tmp_path, tokenizer):
    rows = _pc(15) + [{"prompt": "p" * 40, "completion": "c"}] * 2 + [{"prompt": "p", "completion": "c" * 40}] * 3
    accented = [{"prompt": "café ", "completion": "naïve\tok"}] + _pc(9, 50)
    cfg, (long_, text) = _load(tmp_path, tokenizer, [
        TaskConfig("long", write_jsonl(tmp_path / "long.jsonl", rows), val=write_jsonl(tmp_path / "lv.jsonl", _pc(3))),
        TaskConfig("text", write_jsonl(tmp_path / "text.jsonl", accented), val_fraction=0.2),
    ])
    c = long_.counts
    # Truncation: 2 rows cut to their prompt (no trained token left: lost), 3 cut inside the completion.
    assert (c["train_rows"], c["train_lost_to_max_seq_len"], c["train_truncated"]) == (20, 2, 3)
    assert c["train_dropped_no_trained_tokens"] == 2 and c["train_docs"] == 18
    assert (text.counts["train_unk_tokens"], text.counts["train_rows_with_unk"]) == (3, 1)  # é, ï and the tab
    warnings = data_warnings([long_, text], cfg, tokenizer)
    # 2 lost of 20 is 10%, not more: no warning for losses (see the next tests for one that crosses the line).
    assert warnings == [
        "task 'long': 3 of 20 train rows (15%) are truncated to data.max_seq_len=32 tokens (their ends are not "
        "trained on or evaluated)",
        "task 'text': 1 of 10 train rows hold 3 character(s) the tokenizer cannot encode; they became <unk> "
        "(the built-in tokenizer knows printable ASCII and newlines only)",
    ]


def test_dropping_most_rows_of_a_task_is_a_warning(tmp_path, tokenizer):
    rows = _pc(6) + [{"prompt": "p", "completion": "c" * 40}] * 4
    cfg, (task,) = _load(tmp_path, tokenizer, [TaskConfig("t", write_jsonl(tmp_path / "t.jsonl", rows),
                                                          val=write_jsonl(tmp_path / "v.jsonl", _pc(3)))],
                         overlong="drop")
    assert task.counts["train_dropped_overlong"] == task.counts["train_lost_to_max_seq_len"] == 4
    (warning,) = data_warnings([task], cfg, tokenizer)
    assert warning == ("task 't': 4 of 10 train rows (40%) are lost: longer than data.max_seq_len and dropped "
                       "(data.overlong=drop); raise data.max_seq_len (now 32)")


@pytest.mark.parametrize("lost,warned", [(2, False), (3, True)])
def test_the_warning_starts_above_a_tenth_of_the_rows(tmp_path, tokenizer, lost, warned):
    rows = _pc(20 - lost) + [{"prompt": "p" * 40, "completion": "c"}] * lost
    cfg, (task,) = _load(tmp_path, tokenizer, [TaskConfig("t", write_jsonl(tmp_path / "t.jsonl", rows),
                                                          val=write_jsonl(tmp_path / "v.jsonl", _pc(3)))])
    assert task.counts["train_lost_to_max_seq_len"] == lost
    assert any("are lost" in w for w in data_warnings([task], cfg, tokenizer)) == warned
