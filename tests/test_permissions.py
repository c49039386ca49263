"""Outputs are created with the permissions the umask gives, as files made with `open()` are:
atomic writes go through temporary files, which `tempfile.mkstemp` would create 0600 (issue 19)."""
from __future__ import annotations

import contextlib
import json
import os
import stat

import pytest
from conftest import write_jsonl

UMASKS = [0o022, 0o027]


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root) -> dict[str, int]:
    """Permission bits of every file and folder below `root` (root itself included)."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def _assert_umask_modes(root, mask: int) -> None:
    wrong = {path: oct(mode) for path, mode in _modes(root).items()
             if mode != (0o777 if os.path.isdir(os.path.join(root, path)) else 0o666) & ~mask}
    assert not wrong, f"not what umask {mask:o} gives: {wrong}"


@pytest.mark.parametrize("mask", UMASKS, ids=["022", "027"])
def test_atomic_writers_follow_the_umask(tmp_path, mask):
    from msft_fast.state.atomic_io import current_umask, write_json_atomic
    from msft_fast.report import write_text_atomic

    out = tmp_path / "out"
    with umask(mask):
        assert current_umask() == mask
        out.mkdir()
        write_json_atomic(str(out / "a.json"), {"x": 1})
        write_text_atomic(str(out / "b.md"), "# b\n")
        write_json_atomic(str(out / "a.json"), {"x": 2})  # replacing keeps the umask's mode too
    assert json.load(open(out / "a.json")) == {"x": 2}
    assert sorted(os.listdir(out)) == ["a.json", "b.md"]  # no temporary file left behind
    _assert_umask_modes(out, mask)


def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    from msft_fast.state.atomic_io import write_file_atomic

    (tmp_path / "keep.txt").write_text("old")

    def fill(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file_atomic(str(tmp_path / "keep.txt"), fill)
    assert os.listdir(tmp_path) == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "old"


def _tiny_run_config(tmp_path) -> dict:
    rows = [{"prompt": f"rev {i}: ", "completion": f"{i}x"[::-1]} for i in range(12)]
    return {
        "output_dir": str(tmp_path / "run"),
        "method": "msft",
        "data": {"tasks": [{"name": "t", "train": write_jsonl(tmp_path / "d" / "t.jsonl", rows), "val_fraction": 0.25},
                           {"name": "u", "train": write_jsonl(tmp_path / "d" / "u.jsonl", rows[::-1]),
                            "val_fraction": 0.25}],
                 "max_seq_len": 32, "tokens_per_batch": 64, "cache_dir": str(tmp_path / "cache")},
        "train": {"progress": False, "epochs": 1, "checkpoint_every": 2},
        "msft": {"budget_epochs": 0.5, "evals_per_epoch": 2, "max_stages": 2},
    }


@pytest.mark.slow
@pytest.mark.parametrize("mask", UMASKS, ids=["022", "027"])
def test_every_output_of_a_run_follows_the_umask(tmp_path, mask):
    """history.json, report.md, curves.png, metrics.jsonl, config.yaml, checkpoints/ and final/
    (model.safetensors included: safetensors creates it 0600), after `train` and after `report`."""
    from msft_fast.config import load_config
    from msft_fast.report import write_report
    from msft_fast.run import train

    cfg = _tiny_run_config(tmp_path)
    overrides = [f"output_dir={cfg['output_dir']}", f"data.tasks={json.dumps(cfg['data']['tasks'])}"] + [
        f"{section}.{k}={v}" for section in ("data", "train", "msft") for k, v in cfg[section].items()
        if k != "tasks"] + ["method=msft"]
    with umask(mask):
        train(load_config(None, overrides))
        write_report(cfg["output_dir"])
    out = cfg["output_dir"]
    names = set(os.listdir(out))
    assert {"history.json", "report.md", "curves.png", "metrics.jsonl", "config.yaml", "final", "checkpoints"} <= names
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))
    assert os.listdir(os.path.join(out, "checkpoints"))
    _assert_umask_modes(out, mask)
