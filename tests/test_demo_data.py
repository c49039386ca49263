import json
import os
from pathlib import Path

import pytest

from msft_fast import demo_data
from msft_fast.demo_data import DEMO_VERSION, row_input, row_texts, warmup_entry, write_demo_mixture

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


# --------------------------------------------------------------------------- the calibrated variant


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_calibrated")
    return out, write_demo_mixture(out, seed=0, variant="calibrated")


def test_default_variant_is_the_compact_one_the_tests_use(tmp_path):
    assert demo_data.DEFAULT_VARIANT == "compact"
    write_demo_mixture(tmp_path / "a", seed=0)
    write_demo_mixture(tmp_path / "b", seed=0, variant="compact")
    a = _all_files(tmp_path / "a")
    assert a == _all_files(tmp_path / "b")
    assert "variant" not in json.loads(a["manifest.json"])  # the compact manifest is as it always was
    with pytest.raises(ValueError):
        write_demo_mixture(tmp_path / "c", variant="large")


def test_calibrated_rows_valid_and_sizes(calibrated):
    out, entries = calibrated
    assert [e["name"] for e in entries] == ["upper", "noisy_codes", "reverse", "sort", "add"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["variant"] == "calibrated" and m["demo_version"] == demo_data.CALIBRATED_VERSION
    sizes = {}
    for e in entries + [warmup_entry(out)]:
        for split in ("train", "val"):
            rows = _rows(e[split])
            assert len(rows) == m["files"][f"{e['name']}/{split}.jsonl"]["rows"]
            for row in rows:
                texts = row_texts(row)
                assert all(isinstance(t, str) and t for t in texts)
                assert set("".join(texts)) <= ALLOWED
                assert sum(map(len, texts)) <= demo_data.MAX_ROW_CHARS
            sizes[e["name"], split] = len(rows)
    assert all(sizes[e["name"], "val"] == 160 for e in entries)  # smooth validation curves
    train = [sizes[e["name"], "train"] for e in entries]
    assert len(set(train)) == len(train) and min(train) <= 120 and max(train) >= 800
    assert 5000 <= sizes["warmup", "train"] <= 10_000


def test_calibrated_inputs_never_repeat_across_splits_tasks_and_warmup(calibrated):
    out, entries = calibrated
    groups = {f"{e['name']}/{s}": [row_input(r) for r in _rows(e[s])] for e in entries for s in ("train", "val")}
    warm = warmup_entry(out)
    groups.update({f"warmup/{s}": [row_input(r) for r in _rows(warm[s])] for s in ("train", "val")})
    sets = {k: set(v) for k, v in groups.items()}
    assert all(len(s) >= 20 for s in sets.values())
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert sets[a].isdisjoint(sets[b]), (a, b)


def test_calibrated_noisy_codes_asks_each_fact_five_ways_unseen_in_warmup(calibrated):
    out, entries = calibrated
    rows = _rows(next(e for e in entries if e["name"] == "noisy_codes")["train"])
    facts: dict[str, set] = {}
    for r in rows:
        facts.setdefault(row_input(r), set()).add((r["prompt"], r["completion"]))
    assert len(facts) * 5 == len(rows)
    assert all(len(v) == 5 and len({c for _, c in v}) == 1 for v in facts.values())
    warm_prompts = {r["text"].rsplit("=", 1)[0].replace(row_input(r), "{}", 1) for r in _rows(warmup_entry(out)["train"])}
    sft_prompts = {r["prompt"].rsplit("=", 1)[0].replace(row_input(r), "{}", 1) for r in rows}
    assert sft_prompts.isdisjoint(warm_prompts)


def test_calibrated_deterministic_and_idempotent(tmp_path, calibrated):
    out, _ = calibrated
    write_demo_mixture(tmp_path / "a", seed=0, variant="calibrated")
    assert _all_files(tmp_path / "a") == _all_files(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    write_demo_mixture(tmp_path / "a", seed=0, variant="calibrated")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()} == mtimes
    # switching variants in one folder rewrites it
    write_demo_mixture(tmp_path / "a", seed=0)
    assert "variant" not in json.loads((tmp_path / "a" / "manifest.json").read_text())
    write_demo_mixture(tmp_path / "a", seed=0, variant="calibrated")
    assert _all_files(tmp_path / "a") == _all_files(out)


def test_row_input_of_every_format():
    assert row_input({"prompt": "sorted abcde = ", "completion": "abcde"}) == "abcde"
    assert row_input({"prompt": "sum 123+456=", "completion": "579"}) == "123+456"
    assert row_input({"text": "look up code abcd = x7q2"}) == "abcd"
    assert row_input({"text": "123+456=579"}) == "123+456"
    chat = {"messages": [{"role": "user", "content": "shout abcde ="}, {"role": "assistant", "content": "ABCDE"}]}
    assert row_input(chat) == "abcde"


def test_cli_writes_the_calibrated_variant(tmp_path):
    from msft_fast.cli import main

    assert main(["demo-data", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["variant"] == "calibrated"
    assert main(["demo-data", str(tmp_path / "c"), "--variant", "compact"]) == 0
    assert "variant" not in json.loads((tmp_path / "c" / "manifest.json").read_text())
