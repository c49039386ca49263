"""`make test` runs on two pytest-xdist workers and relies on tests/xdist_groups.py to keep the tests
marked `multiprocess` on one worker, in turn. With pytest-xdist 3.8 on pytest 9.2 xdist's own group
suffix is silently dropped, so this runs a small suite the way the Makefile does and checks where
each test ran, on every stack the suite runs on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.stack

TESTS = os.path.dirname(os.path.abspath(__file__))

PROBE = '''
import os, time, pytest

def _record(name):
    time.sleep(0.3)  # long enough for the scheduler to hand the next test to the other worker
    with open(os.path.join(os.environ["PROBE_OUT"], name), "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.multiprocess
@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
    _record(f"grouped-{i}")

@pytest.mark.parametrize("i", range(4))
def test_free(i):
    _record(f"free-{i}")
'''


def test_multiprocess_tests_run_on_one_worker_in_turn(tmp_path):
    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir()
    out.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    multiprocess: several busy processes\n")
    (suite / "conftest.py").write_text("from xdist_groups import pytest_collection_modifyitems  # noqa: F401\n")
    (suite / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # PYTEST_XDIST_WORKER: ours
    env.update(PROBE_OUT=str(out), PYTHONPATH=os.pathsep.join([TESTS, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                           "loadgroup", str(suite)], cwd=suite, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran_on = {name: (out / name).read_text() for name in os.listdir(out)}
    assert len(ran_on) == 8
    grouped = {ran_on[f"grouped-{i}"] for i in range(4)}
    assert len(grouped) == 1, f"the multiprocess tests ran on workers {sorted(grouped)}, not on one"
    assert set(ran_on.values()) == {"gw0", "gw1"}  # and the others beside them
