import json
import os
from pathlib import Path

import pytest

from msft_fast import demo_data
from msft_fast.demo_data import DEMO_VERSION, row_texts, warmup_entry, write_demo_mixture

ALLOWED = {chr(c) for c in range(32, 127)} | {"\n"}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, write_demo_mixture(out, seed=0)


def _rows(path):
    with open(path, encoding="ascii") as f:
        return [json.loads(line) for line in f]


def _all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _key(row) -> str:
    return json.dumps(row_texts(row)[:-1])  # everything but the answer


def test_entries_shape(mixture):
    out, entries = mixture
    assert 4 <= len(entries) <= 5
    assert len({e["name"] for e in entries}) == len(entries)
    for e in entries:
        assert set(e) == {"name", "train", "val"}
        assert isinstance(e["train"], str) and isinstance(e["val"], str)
        assert Path(e["train"]) == out / e["name"] / "train.jsonl"
        assert Path(e["train"]).is_file() and Path(e["val"]).is_file()


def test_rows_valid_and_chars_allowed(mixture):
    out, entries = mixture
    formats = set()
    for e in entries + [warmup_entry(out)]:
        for split in ("train", "val"):
            raw = Path(e[split]).read_bytes()
            assert raw.endswith(b"\n") and all(b < 128 for b in raw)
            for row in _rows(e[split]):
                if "messages" in row:
                    formats.add("chat")
                    roles = [m["role"] for m in row["messages"]]
                    assert roles in (["user", "assistant"], ["system", "user", "assistant"])
                    assert all(set(m) == {"role", "content"} for m in row["messages"])
                elif "prompt" in row:
                    formats.add("prompt")
                    assert set(row) == {"prompt", "completion"}
                else:
                    formats.add("text")
                    assert set(row) == {"text"}
                texts = row_texts(row)
                assert all(isinstance(t, str) and t for t in texts)
                assert set("".join(texts)) <= ALLOWED
                assert sum(map(len, texts)) <= demo_data.MAX_ROW_CHARS
    assert formats == {"chat", "prompt", "text"}


def test_train_val_disjoint_and_sizes(mixture):
    out, entries = mixture
    sizes = []
    warm = {json.dumps(r) for s in ("train", "val") for r in _rows(warmup_entry(out)[s])}
    for e in entries:
        tr, va = _rows(e["train"]), _rows(e["val"])
        assert 40 <= len(va) <= 80
        ktr, kva = {_key(r) for r in tr}, {_key(r) for r in va}
        assert len(ktr) == len(tr) and len(kva) == len(va)  # no duplicates either
        assert not ktr & kva, e["name"]
        sizes.append(len(tr))
    assert len(set(sizes)) == len(sizes)
    assert min(sizes) <= 120 and max(sizes) >= 800
    wt = _rows(warmup_entry(out)["train"])
    assert 400 <= len(wt) <= 600
    # warm-up rows come from the same families but none of their inputs is an SFT input
    sft_inputs = {row_texts(r)[-2] for e in entries for s in ("train", "val") for r in _rows(e[s])}
    for r in wt:
        t = r["text"]
        inp = t.split("\n")[0] if "\n" in t else t[: max(t.rfind(" "), t.rfind("=")) + 1]
        assert inp and inp not in sft_inputs, t
    assert warm.isdisjoint({json.dumps(r) for e in entries for s in ("train", "val") for r in _rows(e[s])})


def test_deterministic(tmp_path):
    write_demo_mixture(tmp_path / "a", seed=0)
    write_demo_mixture(tmp_path / "b", seed=0)
    write_demo_mixture(tmp_path / "c", seed=1)
    a, b, c = (_all_files(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == c.keys()
    data = [k for k in a if k.endswith(".jsonl")]
    assert all(a[k] != c[k] for k in data)


def test_idempotent_and_manifest(tmp_path):
    out = tmp_path / "demo"
    e1 = write_demo_mixture(out, seed=3)
    m = json.loads((out / "manifest.json").read_text())
    assert m["demo_version"] == DEMO_VERSION and m["seed"] == 3
    assert [t["name"] for t in m["tasks"]] == [e["name"] for e in e1]
    for rel, info in m["files"].items():
        assert (out / rel).stat().st_size == info["bytes"]
        assert len(_rows(out / rel)) == info["rows"]
    assert not [p for p in out.rglob("*.tmp")]

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    e2 = write_demo_mixture(out, seed=3)
    assert e2 == e1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes

    # a different seed, or an incomplete mixture, is rewritten
    before = _all_files(out)
    write_demo_mixture(out, seed=4)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 4
    os.remove(e1[0]["val"])
    write_demo_mixture(out, seed=3)
    assert _all_files(out) == before


def test_warmup_entry_requires_mixture(tmp_path):
    with pytest.raises(FileNotFoundError):
        warmup_entry(tmp_path)
    write_demo_mixture(tmp_path)
    w = warmup_entry(tmp_path)
    assert set(w) == {"name", "train", "val"} and Path(w["train"]).is_file()
