"""Runs started from the checkout's root, as the README shows them: `python -m`, `torchrun -m`.

`-m` puts the current folder first on sys.path, so anything at the root that is importable shadows
an installed package of the same name. transformers (5.25 and newer) imports HF's `kernels` package
while it loads a model; our top-level kernels/ folder must never be what that import finds. These
tests are part of the smoke selection that `make test-newest` and `make test-floor` run against the
newest and the oldest HF stack that pyproject.toml allows (marker `stack`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import demo_tasks, kill_process_tree

pytestmark = pytest.mark.stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# A stand-in for HF's `kernels`: it marks itself, and where HF's package is installed (transformers
# 5.25+ imports names from it) it runs that package's __init__ in its own place.
STAND_IN = """
import importlib.metadata, os
STAND_IN = True
try:
    _real = str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
except importlib.metadata.PackageNotFoundError:
    _real = None
if _real and os.path.isfile(_real):
    __path__[:] = [os.path.dirname(_real)]
    exec(compile(open(_real).read(), _real, "exec"))
"""

# Run as `python -m probe` from the root: what a worker started by torchrun -m sees.
PROBE = """
import importlib.util, json, sys
import msft_fast.run, msft_fast.kernels
from msft_fast.builtin import char_tokenizer, tiny_llama_config
from transformers import LlamaForCausalLM
LlamaForCausalLM(tiny_llama_config(len(char_tokenizer())))  # transformers' own probes for `kernels` run here
import kernels
print(json.dumps({"kernels": kernels.__file__, "stand_in": getattr(kernels, "STAND_IN", False),
                  "ours": msft_fast.kernels.fused_linear_cross_entropy.__module__, "path0": sys.path[0]}))
"""


def _env(tmp_path, *front) -> dict:
    """A child's environment: `front` first on PYTHONPATH (after the root, which -m puts at sys.path[0])."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), PYTHONPATH=os.pathsep.join([*front, TESTS]))
    return env


def _run(cmd, env, timeout=420) -> str:
    # A session of its own, so a hang kills torchrun's workers too, not only the launcher.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{cmd}\n{out[-2000:]}\n{err[-4000:]}"
    return out


def test_import_kernels_from_the_root_finds_the_installed_package_not_our_folder(tmp_path):
    """A stand-in regular package named `kernels`, on sys.path after the root, is what `import
    kernels` gives from the root (our folder has no __init__.py, so it cannot outrank it), while
    msft_fast.kernels still finds our sources."""
    stand_in = tmp_path / "site" / "kernels"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(STAND_IN)
    (tmp_path / "probe.py").write_text(PROBE)
    out = _run([sys.executable, "-m", "probe"], _env(tmp_path, str(tmp_path), str(tmp_path / "site")))
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["path0"] == ROOT  # started the way torchrun starts a worker: the root comes first
    assert seen["stand_in"] is True and seen["kernels"] == str(stand_in / "__init__.py")
    assert seen["ours"] == "msft_fast.kernels.fused_linear_cross_entropy"
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))


def _config(tmp_path, demo_dir, model_dir, method: str) -> str:
    path = tmp_path / f"{method}.yaml"
    path.write_text(f"""
method: {method}
model: {{path: {model_dir}}}
output_dir: {tmp_path / method}
data:
  tasks: [{demo_tasks(demo_dir, ("upper", "noisy_codes", "sort"))}]
  max_seq_len: 64
  tokens_per_batch: 256
  cache_dir: {tmp_path / 'cache'}
train: {{lr: 5.0e-3, epochs: 1, warmup_steps: 2, progress: false}}
msft: {{evals_per_epoch: 4, budget_epochs: 0.5, max_stages: 2}}
""")
    return str(path)


def _assert_final_reloads(run_dir, demo_dir, model_dir, history) -> None:
    """final/ loads with plain HF and gives the validation losses history.json recorded for it."""
    from hf_reference import assert_reproduces_evaluation
    from transformers import AutoTokenizer

    from msft_fast.config import load_config
    from msft_fast.data.tasks import load_tasks

    cfg = load_config(str(run_dir / "config.yaml"), [])
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert tokenizer.chat_template
    assert_reproduces_evaluation(str(run_dir / "final"), load_tasks(cfg.data, tokenizer),
                                 history["evals"][history["final"]["eval_id"]], rel=1e-4)


@pytest.mark.slow
def test_sft_with_python_m_from_the_root_trains_exports_and_reloads(tmp_path, demo_dir, user_model_dir):
    config = _config(tmp_path, demo_dir, user_model_dir, "sft")
    _run([sys.executable, "-m", "msft_fast", "train", "--config", config], _env(tmp_path))
    history = json.load(open(tmp_path / "sft" / "history.json"))
    assert history["status"] == "finished" and history["world_size"] == 1
    _assert_final_reloads(tmp_path / "sft", demo_dir, user_model_dir, history)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_msft_on_two_ranks_with_torchrun_m_from_the_root_rolls_back_exports_and_reloads(tmp_path, demo_dir,
                                                                                         user_model_dir):
    """2 gloo ranks, FSDP2; a scripted metric makes the first task peak at the second evaluation, so
    the run excludes it and rolls back for real."""
    config = _config(tmp_path, demo_dir, user_model_dir, "msft")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "msft_fast.train", "--config", config, "msft.metric=metric_callbacks:scripted"], _env(tmp_path))
    history = json.load(open(tmp_path / "msft" / "history.json"))
    assert history["status"] == "finished" and history["world_size"] == 2
    assert history["stages"][0]["excluded"] == "upper" and history["stages"][0]["rollback_to_eval"] == 1
    _assert_final_reloads(tmp_path / "msft", demo_dir, user_model_dir, history)
