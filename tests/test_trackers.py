"""train.report_to: TensorBoard and W&B (offline) get every logged step, every evaluation per task,
each stage decision and the final summary, read back here from the event files and the offline run.

The end-to-end run also takes its model and one task from Hub names resolved in a hand-made Hub
cache, so one short mSFT run covers the Hub and the trackers together."""
from __future__ import annotations

import json
import logging
import math
import os

import pytest
from conftest import demo_tasks, tiny_llama
from hub_cache import commit_of, folder_files, put_repo, toy_dataset_files

from msft_fast.config import load_config
from msft_fast.state.trackers import TensorBoardTracker, Trackers, describe_stage

MAIN = commit_of("main")


def _tasks(demo_dir) -> str:
    local = demo_tasks(demo_dir, ("upper", "noisy_codes"))
    hub = ("{name: toy, train: org/toy, config: main, val_split: test, "
           "columns: {prompt: question, completion: answer}}")
    return f"[{local}, {hub}]"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, demo_dir, tokenizer):
    """One mSFT run of a Hub model on two local tasks and a Hub dataset, reporting to both trackers."""
    from huggingface_hub import constants

    from msft_fast.run import train

    tmp = tmp_path_factory.mktemp("tracked")
    cache = tmp / "hub"
    model = tmp / "model"
    tiny_llama(tokenizer, seed=1).save_pretrained(model)
    tokenizer.save_pretrained(model)
    put_repo(cache, "org/tiny", folder_files(model), MAIN)
    put_repo(cache, "org/toy", toy_dataset_files(train=40, test=8), MAIN, repo_type="dataset")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                           "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
                           "WANDB_DATA_DIR": str(tmp / "wandb-data")}.items():
            mp.setenv(key, value)
        cfg = load_config(None, [
            f"output_dir={tmp / 'run'}", "model.path=org/tiny", f"data.tasks={_tasks(demo_dir)}", "method=msft",
            "data.max_seq_len=64", "data.tokens_per_batch=512", f"data.cache_dir={tmp / 'cache'}",
            # lr high enough that a task overfits inside a half-epoch roll-out: the run excludes one
            "train.progress=false", "train.lr=2e-2", "train.epochs=1", "train.schedule=constant",
            "msft.evals_per_epoch=4", "msft.budget_epochs=0.5", "train.report_to=[tensorboard, wandb]"])
        history = train(cfg)
    out = cfg.output_dir
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return out, history, metrics


@pytest.mark.slow
def test_hub_names_are_recorded_and_pinned(tracked_run):
    out, history, _ = tracked_run
    assert history["model"] == "org/tiny"
    assert history["config"]["model"]["path"] == "org/tiny"  # what a resume compares: the name, not the cache path
    assert history["hub_commits"] == {"model.path": MAIN, "data.tasks[2].train": MAIN}
    assert history["data_sources"]["toy"]["val"] == {"dataset": "org/toy", "split": "test", "config": "main",
                                                     "revision": "main", "commit": MAIN}
    assert history["data"]["toy"]["train_rows"] == 40 and history["data"]["toy"]["val_rows"] == 8
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, "final")).config.hidden_size == 32


def _events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _texts(acc, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


@pytest.mark.slow
def test_tensorboard_holds_steps_evaluations_per_task_decisions_and_the_summary(tracked_run):
    out, history, metrics = tracked_run
    acc = _events(out)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [m["steps_trained"] for m in metrics]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    lr = acc.Scalars("train/lr")
    assert [e.value for e in lr] == pytest.approx([m["lr"] for m in metrics], rel=1e-6)
    for task in history["tasks"]:
        curve = acc.Scalars(f"eval_tasks/{task}/val_loss")
        assert [(e.step, e.value) for e in curve] == [
            (ev["steps_trained"], pytest.approx(ev["tasks"][task]["val_loss"], rel=1e-6)) for ev in history["evals"]]
        active = [e.value for e in acc.Scalars(f"eval_tasks/{task}/active")]
        assert active == [float(ev["tasks"][task]["active"]) for ev in history["evals"]]
        assert [e.value for e in acc.Scalars(f"train_tasks/{task}/loss")]  # per-task training curves too
    stages = history["stages"]
    assert any(s["excluded"] for s in stages), "the run must exercise an exclusion"
    assert [text for _, text in _texts(acc, "stages")] == [describe_stage(s) for s in stages]
    excluded = [text for _, text in _texts(acc, "stages") if "excluded '" in text]
    assert excluded and all("rolled back to eval" in text for text in excluded)
    assert [e.value for e in acc.Scalars("stages/excluded_a_task")] == [float(s["excluded"] is not None)
                                                                          for s in stages]
    [(_, report)] = _texts(acc, "report")
    assert report.startswith("# msft-fast run report") and "## Stages" in report
    assert acc.Scalars("final/eval_id")[0].value == history["final"]["eval_id"]
    assert acc.Scalars("totals/train_flops")[0].value == pytest.approx(history["totals"]["train_flops"], rel=1e-6)
    assert "custom_scalars__config__" in acc.Tags()["tensors"]  # the per-task overlay charts
    [(_, config)] = _texts(acc, "config")
    assert "report_to:\n  - tensorboard\n  - wandb\n" in config and "path: org/tiny\n" in config


@pytest.mark.slow
def test_wandb_offline_run_holds_the_same_records(tracked_run):
    from wandb_records import read_offline_run

    out, history, metrics = tracked_run
    run = read_offline_run(os.path.join(out, "wandb"))
    assert history["trackers"]["wandb"]["id"] == run["id"] and history["trackers"]["wandb"]["mode"] == "offline"
    steps = [row for row in run["history"] if "train/loss" in row]
    assert [(r["steps_trained"], r["train/loss"]) for r in steps] == [(m["steps_trained"], m["loss"]) for m in metrics]
    evals = [row for row in run["history"] if "eval/pooled_val_loss" in row]
    assert [(r["steps_trained"], r["eval_tasks/toy/val_loss"]) for r in evals] == [
        (e["steps_trained"], e["tasks"]["toy"]["val_loss"]) for e in history["evals"]]
    decisions = [row for row in run["history"] if "stages/stage" in row]
    assert [r["stages/stage"] for r in decisions] == [s["stage"] for s in history["stages"]]
    assert [r["stages/decisions/nrows"] for r in decisions] == list(range(1, len(history["stages"]) + 1))
    assert run["summary"]["final/eval_id"] == history["final"]["eval_id"]
    assert run["summary"]["report"].startswith("# msft-fast run report")
    assert run["exit_code"] == 0
    assert run["config"]["method"] == "msft"  # the run's config went along
    assert run["config"]["model"]["path"] == "org/tiny"


# ---------------------------------------------------------------------------------------------
# Fast checks of the parts


def test_a_tracker_that_is_not_installed_names_the_extra(tmp_path, demo_dir, capsys, monkeypatch):
    import importlib.util

    from msft_fast.state import trackers
    from msft_fast.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name))
    task = f"{{name: upper, train: {demo_dir / 'upper' / 'train.jsonl'}, val_fraction: 0.2}}"
    assert main(["train", f"output_dir={tmp_path / 'run'}", f"data.tasks=[{task}]", "train.report_to=wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["msft-fast: error: config key 'train.report_to' lists wandb, but the wandb package is not "
                   "installed: pip install 'msft-fast[wandb]'"]


def test_report_to_takes_a_list_one_name_or_none():
    def report_to(value):
        return load_config(None, ["output_dir=o", "data.tasks=[{name: t, train: t.jsonl, val_fraction: 0.1}]",
                                  f"train.report_to={value}"]).train.report_to

    assert report_to("[tensorboard, wandb]") == ["tensorboard", "wandb"]
    assert report_to("wandb") == ["wandb"] and report_to("none") == [] and report_to("[]") == []
    from msft_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="config key 'train.report_to\\[0\\]' must be one of tensorboard, wandb"):
        report_to("mlflow")


class _Recorder:
    name = "recorder"

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def log_step(self, step, scalars):
        if self.fail:
            raise OSError("No space left on device")
        self.calls.append((step, scalars))

    def close(self, failed):
        self.calls.append(("closed", failed))


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_others_go_on(caplog):
    bad, good = _Recorder(fail=True), _Recorder()
    fan_out = Trackers([bad, good])
    record = {"step": 3, "steps_trained": 5, "loss": 1.5, "skipped": True, "time": {"data": 0.1},
              "tasks": {"a": {"loss": 2.0, "tokens": 7}}}
    with caplog.at_level(logging.WARNING, logger="msft_fast"):
        fan_out.log_step(record)
        fan_out.log_step(record)
    assert [r.getMessage() for r in caplog.records] == [
        "recorder: log_step failed (OSError: No space left on device); it gets no more metrics from this run"]
    assert good.calls == [(5, {"train/step": 3.0, "train/steps_trained": 5.0, "train/loss": 1.5, "train/skipped": 1.0,
                               "train/time/data": 0.1, "train_tasks/a/loss": 2.0, "train_tasks/a/tokens": 7.0})] * 2
    fan_out.close()
    assert good.calls[-1] == ("closed", False) and not fan_out


def test_tensorboard_hides_what_a_resumed_run_logs_again(tmp_path):
    """A run checkpointed at step 4 and killed at 6 logs 5 and 6 again when it resumes: TensorBoard
    shows each step once, with the resumed values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardTracker(str(tmp_path), {}, resumed_step=0)
    for step in range(1, 7):
        first.log_step(step, {"train/loss": float(step)})
    first.close(failed=True)
    resumed = TensorBoardTracker(str(tmp_path), {}, resumed_step=4)
    for step in range(5, 8):
        resumed.log_step(step, {"train/loss": 10.0 * step})
    resumed.close(failed=False)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0)]


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from wandb_records import read_offline_run

    from msft_fast.state.trackers import WandbTracker

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(key, value)
    state: dict = {}  # history.json `trackers`, carried by the checkpoint
    first = WandbTracker(str(tmp_path / "run"), {"method": "sft"}, state)
    first.log_step(1, {"train/loss": 2.0})
    first.close(failed=True)
    run_id = state["wandb"]["id"]
    assert read_offline_run(str(tmp_path / "run" / "wandb"))["exit_code"] == 1  # the interrupted attempt
    again = WandbTracker(str(tmp_path / "run"), {"method": "sft"}, state)
    again.log_step(2, {"train/loss": 1.0})
    again.close(failed=False)
    assert state["wandb"]["id"] == run_id and state["wandb"]["mode"] == "offline"
    resumed = read_offline_run(str(tmp_path / "run" / "wandb"))
    assert resumed["id"] == run_id and resumed["exit_code"] == 0
    assert [(r["steps_trained"], r["train/loss"]) for r in resumed["history"] if "train/loss" in r] == [(2, 1.0)]


def test_nan_and_infinite_values_never_reach_a_tracker_as_inf():
    from msft_fast.state.trackers import eval_scalars

    scalars = eval_scalars({"eval_id": 1, "steps_trained": 2, "pooled_val_loss": math.inf, "stage": 0,
                            "tasks": {"a": {"val_loss": float("nan"), "active": False}}})
    assert "eval/pooled_val_loss" not in scalars and math.isnan(scalars["eval_tasks/a/val_loss"])
    assert scalars["eval_tasks/a/active"] == 0.0
