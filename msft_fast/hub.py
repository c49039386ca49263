"""Hugging Face Hub names for the model and the tasks, resolved through `huggingface_hub` and its cache.

A name that is not a local path (`Qwen/Qwen2.5-0.5B`, `openai/gsm8k`) is a Hub repo id, as in
`from_pretrained` and `load_dataset`. Rank 0 pins each to one commit (`pin_commits`: the Hub's
answer, or the cache's when offline; on resume, the commits the run started from), so that every
rank and node reads the same files; the model's files are then fetched into the Hub cache
(`model_snapshot`), from where everything loads as from a local folder.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Callable, Optional

from msft_fast.config import BUILTIN_MODEL_PREFIX, Config, ModelConfig, TaskConfig, resolve_path
from msft_fast.errors import ConfigError, DataError, ModelError, UserError

log = logging.getLogger("msft_fast")

# Repo ids as the Hub allows them: 'name' or 'namespace/name', letters, digits and - _ . (no -- or ..).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# A missing path with one of these endings is a file the user meant, not a repo id.
_FILE_ENDINGS = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt", ".safetensors", ".bin", ".yaml", ".yml")

# The files `from_pretrained` reads besides the weights: config, generation config, tokenizer files,
# chat templates, the weight index. Top level only: sub-folders (original/, onnx/, ...) hold other
# formats of the same weights that it never reads.
_METADATA_ENDINGS = (".json", ".txt", ".model", ".tiktoken", ".jinja")
# One set of weights, in from_pretrained's order of preference: (single file, index of shards).
_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def hub_repo_id(path: str) -> Optional[str]:
    """`path` as a Hub repo id, or None when it names a local file or folder.

    As in `from_pretrained`, something that exists on disk is local. So is a path that starts with
    / . or ~, has more than one /, or ends like a data or weights file (a missing `data/x.jsonl` is a
    missing file, not a repo)."""
    if os.path.exists(resolve_path(path)) or not _REPO_ID.match(path) or "--" in path or ".." in path:
        return None
    return None if path.lower().endswith(_FILE_ENDINGS) else path


def is_offline() -> bool:
    """HF_HUB_OFFLINE=1 (read by huggingface_hub when imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    """The Hub cache folder (HF_HUB_CACHE, else HF_HOME/hub), read at call time."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cache_folder(repo_id: str, repo_type: str) -> str:
    """`models--org--name` or `datasets--org--name` in the Hub cache (huggingface_hub's layout)."""
    return os.path.join(hub_cache(), f"{repo_type}s--{repo_id.replace('/', '--')}")


def cached_commit(repo_id: str, repo_type: str, revision: Optional[str]) -> Optional[str]:
    """The commit the cache knows for `revision` (a branch or tag, through refs/; a commit as it is)."""
    revision = revision or "main"
    if _COMMIT.match(revision):
        return revision
    try:
        with open(os.path.join(cache_folder(repo_id, repo_type), "refs", revision), encoding="ascii") as f:
            commit = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.match(commit) else None


def cached_snapshot(repo_id: str, repo_type: str, commit: Optional[str]) -> Optional[str]:
    """The cache's snapshot folder of `commit`, if it has one."""
    if commit is None:
        return None
    folder = os.path.join(cache_folder(repo_id, repo_type), "snapshots", commit)
    return folder if os.path.isdir(folder) else None


class HubSource:
    """One Hub repo a run reads, and how to name it in an error: `where` is the sentence's subject
    (the config key, the task), `revision_key` the key that set the revision."""

    def __init__(self, repo_id: str, repo_type: str, revision: Optional[str], where: str, revision_key: str):
        self.repo_id, self.repo_type, self.revision = repo_id, repo_type, revision
        self.where, self.revision_key = where, revision_key

    @property
    def kind(self) -> str:
        return "model" if self.repo_type == "model" else "dataset"

    def describe(self) -> str:
        return f"the Hub {self.kind} '{self.repo_id}' (revision {self.revision or 'main'})"

    def error(self, text: str) -> UserError:
        cls = ModelError if self.repo_type == "model" else DataError
        return cls(f"{self.where}: {text}")

    def pin(self) -> Optional[str]:
        """The commit `revision` names now: asked of the Hub, and remembered in the cache's refs/
        as huggingface_hub does; offline, or when the Hub cannot be reached, the cache's answer.
        None when neither knows (the loaders then say what is missing)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        if self.revision is not None and _COMMIT.match(self.revision):
            return self.revision
        if not is_offline():
            try:
                commit = HfApi().repo_info(self.repo_id, repo_type=self.repo_type, revision=self.revision).sha
            except GatedRepoError:
                raise self.error(f"{self.describe()} is gated: accept its terms on the Hub, then log in "
                                 "(`hf auth login` or HF_TOKEN)") from None
            except RepositoryNotFoundError:
                raise self.error(f"'{self.repo_id}' is not a local path, and the Hub has no {self.kind} of that "
                                 "name (or it is private: log in with `hf auth login` or set HF_TOKEN)") from None
            except RevisionNotFoundError:
                raise ConfigError(f"config key '{self.revision_key}': the Hub {self.kind} '{self.repo_id}' has no "
                                  f"revision '{self.revision}'") from None
            except Exception as e:  # no network, a proxy, the Hub down: the cache may still know it
                log.warning("cannot reach the Hub for %s (%s); looking in the local cache", self.describe(), _short(e))
            else:
                _remember_ref(self.repo_id, self.repo_type, self.revision, commit)
                return commit
        return cached_commit(self.repo_id, self.repo_type, self.revision)

    def not_cached(self, why: str = "") -> UserError:
        """The error for a repo that neither the Hub nor the cache can give."""
        if is_offline():
            how = (f"and HF_HUB_OFFLINE=1 forbids downloading it: download it where the Hub can be reached "
                   f"(`hf download {'--repo-type dataset ' if self.kind == 'dataset' else ''}{self.repo_id}`) "
                   "or unset HF_HUB_OFFLINE")
        else:
            how = f"and the Hub could not be reached{f' ({why})' if why else ''}"
        return self.error(f"'{self.repo_id}' is not a local path, {self.describe()} is not in the local Hub cache "
                          f"({hub_cache()}), {how}")


def _remember_ref(repo_id: str, repo_type: str, revision: Optional[str], commit: str) -> None:
    """Write refs/<revision> as huggingface_hub does, so that an offline run finds this commit later."""
    revision = revision or "main"
    path = os.path.join(cache_folder(repo_id, repo_type), "refs", revision)
    try:
        with open(path, encoding="ascii") as f:
            if f.read().strip() == commit:
                return
    except (OSError, UnicodeDecodeError):
        pass
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(commit)
        os.replace(tmp, path)
    except OSError as e:  # a read-only shared cache: the run goes on, only offline reuse suffers
        log.warning("cannot record %s -> %s in the Hub cache (%s)", revision, commit, e.strerror)


# ---------------------------------------------------------------------------------------------
# The run's Hub sources, pinned once


def model_source(cfg: ModelConfig) -> Optional[HubSource]:
    """model.path as a Hub model (None: a local folder or a built-in model). model.revision is
    refused for a local folder, where it would silently mean nothing."""
    repo = None if cfg.path.startswith(BUILTIN_MODEL_PREFIX) else hub_repo_id(cfg.path)
    if repo is None:
        if cfg.revision is not None:
            what = "a built-in model" if cfg.path.startswith(BUILTIN_MODEL_PREFIX) else "a local path"
            raise ConfigError(f"config key 'model.revision' ({cfg.revision}) applies to a Hub model, but model.path "
                              f"{cfg.path} is {what}")
        return None
    return HubSource(repo, "model", cfg.revision, "config key 'model.path'", "model.revision")


def dataset_source(task: TaskConfig, index: int, field: str) -> Optional[HubSource]:
    """A task's `train` or `val` as a Hub dataset (None: a local file or folder, or not set)."""
    value = getattr(task, field)
    repo = hub_repo_id(value) if value else None
    if repo is None:
        return None
    key, revision = f"data.tasks[{index}]", "revision" if field == "train" else "val_revision"
    return HubSource(repo, "dataset", getattr(task, revision), f"task '{task.name}' (config key '{key}.{field}')",
                     f"{key}.{revision}")


def hub_sources(cfg: Config) -> dict[str, HubSource]:
    """Every Hub repo the config names, by the config key that names it."""
    out: dict[str, HubSource] = {}
    model = model_source(cfg.model)
    if model is not None:
        out["model.path"] = model
    for i, task in enumerate(cfg.data.tasks):
        for field in ("train", "val"):
            source = dataset_source(task, i, field)
            if source is not None:
                out[f"data.tasks[{i}].{field}"] = source
    return out


def pin_commits(cfg: Config, pinned: Optional[dict[str, str]] = None) -> dict[str, Optional[str]]:
    """The commit of every Hub repo the config names, by config key (rank 0 calls this and shares the
    result). `pinned`: commits a resumed run started from, kept as they are (the config names the
    same repos and revisions, or the run would not resume), so that it reads the same files."""
    pinned = pinned or {}
    return {key: pinned.get(key) or source.pin() for key, source in hub_sources(cfg).items()}


# ---------------------------------------------------------------------------------------------
# Models


def model_files(names: list[str], read_index: Callable[[str], dict]) -> list[str]:
    """The files of a model repo holding `names` that `from_pretrained` reads: the top-level config,
    tokenizer and template files, and one set of weights (safetensors before PyTorch .bin; one file
    before shards, which `read_index(index_name)` lists)."""
    top = [n for n in names if "/" not in n]
    files = [n for n in top if n.endswith(_METADATA_ENDINGS)]
    for single, index in _WEIGHT_FILES:
        if single in top:
            return sorted(set(files) | {single})
        if index in top:
            shards = read_index(index).get("weight_map", {}).values()
            return sorted(set(files) | set(shards))
    return sorted(files)


def model_snapshot(source: HubSource, commit: Optional[str]) -> str:
    """The local snapshot folder of the Hub model at `commit`, with every file `from_pretrained` reads,
    downloaded into the Hub cache first when missing. The first rank of each node calls this before
    the others, which then find the files cached."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if commit is None:  # neither the Hub nor the cache knows the revision
        raise source.not_cached()
    cache = hub_cache()
    names, why = None, ""
    cached = cached_snapshot(source.repo_id, "model", commit)
    if not is_offline():
        try:
            names = HfApi().list_repo_files(source.repo_id, revision=commit)
        except Exception as e:  # unreachable: what the cache holds is all there is
            why = _short(e)
    names_from_cache = names is None
    if names_from_cache:
        if cached is None:
            raise source.not_cached(why)
        names = [os.path.relpath(p, cached) for p in glob.glob(os.path.join(cached, "*"))]

    def fetch(files: list[str]) -> str:
        if names_from_cache:  # nothing to download from; snapshot_download's offline behaviour differs
            return cached   # between huggingface_hub releases (1.33 refuses a complete cached commit)
        try:
            return snapshot_download(source.repo_id, revision=commit, cache_dir=cache,
                                     allow_patterns=[glob.escape(f) for f in files] or ["config.json"])
        except LocalEntryNotFoundError as e:  # offline and the snapshot is incomplete (or missing)
            raise source.not_cached(_short(e)) from None
        except OSError as e:  # the disk: full, read-only
            raise source.error(f"cannot download {source.describe()} into {cache}: {_short(e)}") from None

    meta = [n for n in names if "/" not in n and n.endswith(_METADATA_ENDINGS)]
    folder = fetch(meta)

    def read_index(name: str) -> dict:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise source.error(f"{source.describe()}: cannot read its {name} ({_short(e)})") from None

    wanted = model_files(names, read_index)
    folder = fetch(wanted)
    missing = [f for f in wanted if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise source.error(f"the cached snapshot of {source.describe()} in {folder} lacks "
                           f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
                           + ("download it again where the Hub can be reached" if is_offline() or why
                              else "the download did not complete"))
    return folder


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
