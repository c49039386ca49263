"""Shared fixtures. Everything is built locally: no download happens in any test."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile

# Before anything imports triton or datasets: the Triton interpreter runs kernels on CPU tensors,
# and caches go to a private folder so tests never touch (or depend on) the user's caches.
_CACHE = tempfile.mkdtemp(prefix="msft-fast-tests-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
# One thread per process, set before torch starts its pools: `make test` runs two pytest workers on
# the 2 cores it is sized for, and every process a test starts inherits os.environ. Measured on these
# machines (ENVIRONMENT.md): oversubscribed OpenMP threads made training steps about 70x slower.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from xdist_groups import pytest_collection_modifyitems  # noqa: E402,F401  (the multiprocess group)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from msft_fast.builtin import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from msft_fast.demo_data import write_demo_mixture

    out = tmp_path_factory.mktemp("demo")
    write_demo_mixture(out, seed=0)
    return out


def demo_tasks(demo_dir, names) -> str:
    """The entries of `data.tasks` (without the brackets) for the demo tasks `names`, each with its
    train and val file: `f"data.tasks=[{demo_tasks(demo_dir, names)}]"`."""
    return ", ".join(f"{{name: {n}, train: {demo_dir / n / 'train.jsonl'}, val: {demo_dir / n / 'val.jsonl'}}}"
                     for n in names)


def tiny_llama(tokenizer, tie: bool = False, seed: int = 0):
    from transformers import LlamaForCausalLM

    from msft_fast.builtin import tiny_llama_config

    config = tiny_llama_config(len(tokenizer))
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 32, 64, 2
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def user_model_dir(tmp_path_factory, tokenizer):
    """A user's own local HF model folder: config, safetensors and tokenizer (tied embeddings)."""
    folder = tmp_path_factory.mktemp("user-model")
    model = tiny_llama(tokenizer, tie=True, seed=1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def answering_model_dir(tmp_path_factory, tokenizer):
    """A model folder whose greedy answers are varied strings (untied; a tied random init tends to
    stop at once), for exact-match tests whose scores are known in advance (tests/known_answers.py)."""
    folder = tmp_path_factory.mktemp("answering-model")
    tiny_llama(tokenizer, tie=False, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in sessions of their own,
    so killing the launcher's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
