"""The distribution: every subpackage ships, kernels/ only as msft_fast.kernels; the sdist and the
wheel built from it install into a fresh virtual environment beside the pinned stack (not our
editable install) and train from outside the source tree; the package installs and runs on
Python 3.10 as `requires-python` promises."""
from __future__ import annotations

import ast
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport (the [test] extra installs it there)
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("msft_fast", "kernels", "tests", "bench")  # every Python file of the project
# Left out of the copy the build starts from: local state that a checkout may hold.
NOT_SOURCE = {".venv", ".git", "runs", "data", "build", "dist", ".pytest_cache", ".cache"}


def test_every_subpackage_is_listed_and_kernels_is_namespaced_without_a_bare_package():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    listed = set(tool["packages"])
    on_disk = {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(ROOT, "msft_fast"))
        if "__init__.py" in files
    }
    assert on_disk == listed and "msft_fast.kernels" in listed
    assert "kernels" not in listed  # a bare `kernels` would shadow the HF `kernels` package
    # Nor may the sources' folder be a regular package: from the checkout's root (first on sys.path
    # under -m) it would outrank HF's installed `kernels`. Its modules ship through setup.py instead.
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    assert [n for n in os.listdir(os.path.join(ROOT, "msft_fast", "kernels")) if n != "__pycache__"] == ["__init__.py"]


def _pins(path: str) -> dict:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            [spec] = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_the_floor_stage_installs_every_lower_bound_pyproject_promises():
    """make test-floor installs requirements/floor.txt: each dependency's (and pytest's) lower bound in
    pyproject.toml must be what it pins, so a bound cannot move without the floor stage testing it."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    floor = _pins(os.path.join(ROOT, "requirements", "floor.txt"))
    pytest_req = next(r for r in project["optional-dependencies"]["test"] if r.startswith("pytest"))
    for line in project["dependencies"] + [pytest_req]:
        req = Requirement(line)
        [spec] = req.specifier
        name = canonicalize_name(req.name)
        assert spec.operator == ">=", line
        assert Version(floor[name]) == Version(spec.version), (line, floor.get(name))
    pinned = _pins(os.path.join(ROOT, "requirements", "torch-cpu.txt"))
    assert set(pinned) == {"torch", "triton"}
    assert Version(pinned["torch"]) >= Version(floor["torch"])


def test_users_import_the_loss_from_msft_fast_kernels():
    from msft_fast.kernels import TaskStats, fused_linear_cross_entropy

    assert callable(fused_linear_cross_entropy) and TaskStats._fields == ("loss_sum", "tokens", "correct")


def _env(**extra) -> dict:
    """A child's environment: no PYTHONPATH (nothing of the source tree leaks in), offline, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(args, cwd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`python -m build --no-isolation` on a copy of the checkout: the sdist, then the wheel built
    from the unpacked sdist, so the sdist must hold all the wheel needs. No network: the backend
    (setuptools) is the test environment's."""
    tmp = tmp_path_factory.mktemp("dist")

    def ignore(folder, names):
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or (os.path.samefile(folder, ROOT) and n in NOT_SOURCE)]

    shutil.copytree(ROOT, tmp / "src", ignore=ignore)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "out", tmp / "src"], cwd=tmp,
         env=_env())
    [wheel] = glob.glob(str(tmp / "out" / "*.whl"))
    [sdist] = glob.glob(str(tmp / "out" / "*.tar.gz"))
    return tmp, wheel, sdist


def _stack_view(folder) -> str:
    """This test environment's site-packages as links, less our own editable install: the pinned
    stack (torch, transformers, ...) without msft_fast. A path in a .pth file is put on sys.path
    as it is, so the links' own .pth files (the editable finder's among them) are not run."""
    site = sysconfig.get_paths()["purelib"]
    os.makedirs(folder)
    for name in os.listdir(site):
        if name.startswith(("msft_fast", "__editable__", "msft-fast")) or name.endswith(".pth"):
            continue
        os.symlink(os.path.join(site, name), os.path.join(folder, name))
    return str(folder)


def _fresh_env(folder, python: str, stack: str | None) -> str:
    """A virtual environment of `python` with no packages; `stack`: a folder its site-packages sees."""
    _run([python, "-m", "venv", "--without-pip", folder], cwd=os.path.dirname(folder))
    env_python = os.path.join(folder, "bin", "python")
    if stack is not None:
        site = _run([env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder)
        with open(os.path.join(site.stdout.strip(), "pinned-stack.pth"), "w") as f:
            f.write(stack + "\n")
    return env_python


def _install(wheel: str, env_python: str, cwd) -> None:
    """pip (this environment's, run for the target interpreter) installs the wheel alone: --no-deps, --no-index."""
    _run([sys.executable, "-m", "pip", "--python", env_python, "install", "--no-deps", "--no-index", "--quiet",
          wheel], cwd=cwd, env=_env())


def test_the_wheel_and_sdist_ship_the_package_and_nothing_else(built):
    _, wheel, sdist = built
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read("msft_fast-0.1.0.dist-info/entry_points.txt").decode()
        metadata = z.read("msft_fast-0.1.0.dist-info/METADATA").decode()
    assert {n.split("/")[0] for n in names} == {"msft_fast", "msft_fast-0.1.0.dist-info"}  # no bare `kernels`
    for shipped in ("msft_fast/py.typed", "msft_fast/kernels/__init__.py", "msft_fast/kernels/triton_flce.py",
                    "msft_fast/kernels/reference.py", "msft_fast/hub.py", "msft_fast/state/trackers.py"):
        assert shipped in names
    py_files = {os.path.relpath(p, ROOT)
                for p in glob.glob(os.path.join(ROOT, "msft_fast", "**", "*.py"), recursive=True)}
    py_files |= {"msft_fast/kernels/" + os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "kernels", "*.py"))}
    assert py_files <= set(names)
    assert "msft-fast = msft_fast.cli:main" in entry_points
    assert "Requires-Python: >=3.10" in metadata
    for extra in ("tensorboard", "wandb", "gpu", "test"):
        assert f"Provides-Extra: {extra}" in metadata
    assert 'Requires-Dist: wandb>=0.17; extra == "wandb"' in metadata
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    for needed in ("kernels/triton_flce.py", "msft_fast/py.typed", "tests/conftest.py", "tests/hub_cache.py",
                   "requirements/dev-cpu.txt", "configs/demo.yaml", "Makefile", "pyproject.toml", "README.md"):
        assert needed in members
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in members)


@pytest.mark.slow
def test_the_wheel_installs_beside_the_pinned_stack_and_trains_outside_the_source_tree(built, tmp_path):
    _, wheel, _ = built
    python = _fresh_env(tmp_path / "env", sys.executable, _stack_view(tmp_path / "stack"))
    _install(wheel, python, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    where = _run([python, "-c", "import msft_fast, msft_fast.kernels, importlib.util; "
                                "print(msft_fast.__file__); spec = importlib.util.find_spec('kernels'); "
                                "print(spec.origin if spec else None)"],
                 cwd=work, env=_env()).stdout.split()
    assert where[0].startswith(str(tmp_path / "env"))  # the wheel's copy
    # No bare `kernels` of ours: none at all, or HF's (transformers 5.25+ depends on it) from the stack.
    assert where[1] == "None" or where[1].startswith(str(tmp_path / "stack")), where[1]
    cli = str(tmp_path / "env" / "bin" / "msft-fast")
    assert "train" in _run([cli, "--help"], cwd=work, env=_env()).stdout
    _run([cli, "demo-data", "data", "--variant", "compact"], cwd=work, env=_env())
    (work / "run.yaml").write_text(
        "method: sft\noutput_dir: runs/tiny\n"
        "data:\n  tasks:\n"
        "    - {name: upper, train: data/upper/train.jsonl, val: data/upper/val.jsonl}\n"
        "    - {name: sort, train: data/sort/train.jsonl, val_fraction: 0.1}\n"
        "  max_seq_len: 64\n  tokens_per_batch: 512\n  cache_dir: cache\n"
        "train: {epochs: 0.25, lr: 1.0e-3, progress: false, checkpoint_every: 0}\n"
        "msft: {evals_per_epoch: 4}\n")
    _run([cli, "train", "--config", "run.yaml"], cwd=work, env=_env(HF_DATASETS_CACHE=str(tmp_path / "ds")))
    with open(work / "runs" / "tiny" / "history.json") as f:
        history = json.load(f)
    assert history["status"] == "finished" and history["totals"]["steps"] > 0
    assert os.path.exists(work / "runs" / "tiny" / "final" / "model.safetensors")


def _python310() -> str | None:
    """A working Python 3.10: pyenv's builds first (its shims fail for a version not selected), then PATH."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv, "versions", "3.10*", "bin", "python3.10")))
    candidates += [p for p in (shutil.which("python3.10"), "/usr/bin/python3.10") if p]
    for found in candidates:
        try:
            subprocess.run([found, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"], check=True,
                           capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        return found
    return None


# Run by Python 3.10 over the project's sources: every `from <stdlib module> import name` must
# resolve there, and a module that 3.10's standard library lacks (tomllib, ...) may be imported
# only inside a try whose handler catches ImportError.
_CHECK_310 = r"""
import ast, importlib, json, sys
newer = set(json.loads(sys.argv[1]))  # modules in the newer stdlib that 3.10's lacks
problems = []
for path in sys.argv[2:]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                or isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") in ("ImportError", "ModuleNotFoundError")
                                                          for e in h.type.elts)
                for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods = [node.module]
        else:
            continue
        for mod in mods:
            top = mod.split(".")[0]
            if top in newer and id(node) not in guarded:
                problems.append(f"{path}:{node.lineno}: import {mod} (not in Python 3.10's standard library)")
            elif isinstance(node, ast.ImportFrom) and top in sys.stdlib_module_names and id(node) not in guarded:
                module = importlib.import_module(mod)
                for alias in node.names:
                    if alias.name != "*" and not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{mod}.{alias.name}")
                        except ImportError:
                            problems.append(f"{path}:{node.lineno}: from {mod} import {alias.name} (not in 3.10)")
print(json.dumps(problems))
"""


@pytest.mark.slow
def test_python_3_10_installs_the_wheel_compiles_every_file_and_finds_every_stdlib_import(built, tmp_path):
    """requires-python says 3.10. Its interpreter here has no torch for 3.10 (none can be installed
    offline), so the suite itself cannot run under it; what can be checked without torch is."""
    python310 = _python310()
    if python310 is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    _, wheel, _ = built
    python = _fresh_env(tmp_path / "env310", python310, None)
    _install(wheel, python, tmp_path)
    version = _run([python, "-c", "import sys; print(sys.version_info[:2])"], cwd=tmp_path).stdout.strip()
    assert version == "(3, 10)"
    usage = _run([str(tmp_path / "env310" / "bin" / "msft-fast"), "--help"], cwd=tmp_path, env=_env()).stdout
    assert usage.startswith("usage: msft-fast")
    files = sorted(p for folder in SOURCES for p in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True))
    # Syntax: every file compiles under 3.10 (nothing is written into the source tree).
    compiled = _run([python, "-c", "import sys\nfor p in sys.argv[1:]: compile(open(p, encoding='utf-8').read(), p, "
                                   "'exec')\nprint(len(sys.argv) - 1)", *files], cwd=tmp_path)
    assert int(compiled.stdout) == len(files) > 50
    names310 = json.loads(_run([python, "-c", "import sys, json; print(json.dumps(sorted(sys.stdlib_module_names)))"],
                               cwd=tmp_path).stdout)
    newer = sorted(set(getattr(sys, "stdlib_module_names", ())) - set(names310))
    problems = json.loads(_run([python, "-c", _CHECK_310, json.dumps(newer), *files], cwd=tmp_path).stdout)
    assert problems == []


def test_the_3_10_check_catches_what_it_is_for(tmp_path):
    """The checker itself, run here: a bare tomllib import and a 3.11 name are caught; a guarded
    import is not."""
    bad = tmp_path / "bad.py"
    bad.write_text("import tomllib\nfrom typing import NotARealName\ntry:\n    import tomllib\n"
                   "except ModuleNotFoundError:\n    import tomli as tomllib\n")
    out = subprocess.run([sys.executable, "-c", _CHECK_310, json.dumps(["tomllib"]), str(bad)], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == [f"{bad}:1: import tomllib (not in Python 3.10's standard library)",
                               f"{bad}:2: from typing import NotARealName (not in 3.10)"]
    assert ast.parse(bad.read_text())  # the file itself is valid Python
