"""`msft-fast launch` (torchrun with the documented exit codes), on 2 CPU ranks with gloo: bad input
is one line from rank 0 and exit 2; SIGTERM / SIGINT checkpoint, say so in one line and exit 143 / 130.
Plain torchrun would answer each of these with its ChildFailedError or SignalException report, exit 1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_resume import _finish, _wait_for_steps  # a subprocess's end; a run's progress in metrics.jsonl
from conftest import demo_tasks

from msft_fast.runtime.launch import _failure_code, parse_launch_args


def _config(tmp_path, demo_dir) -> str:
    tasks = demo_tasks(demo_dir, ("upper", "noisy_codes", "sort"))
    path = tmp_path / "config.yaml"
    path.write_text(f"method: msft\noutput_dir: {tmp_path / 'run'}\n"
                    f"data: {{tasks: [{tasks}], max_seq_len: 64, tokens_per_batch: 512, "
                    f"cache_dir: {tmp_path / 'cache'}}}\n"
                    "train: {lr: 3.0e-3, epochs: 20, progress: false, checkpoint_every: 1000}\n"
                    "msft: {budget_epochs: 5, evals_per_epoch: 1, max_stages: 2}\n")
    return str(path)


def _launch(tmp_path, *args) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOGLEVEL", None)
    return subprocess.Popen([sys.executable, "-m", "msft_fast.runtime.launch", "--standalone", "--nproc_per_node", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _only_line(err: str, prefix: str) -> str:
    """Exactly one line of ours on stderr; everything else is our own timestamped INFO log."""
    assert "Traceback" not in err and "ChildFailedError" not in err and "SignalException" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("msft-fast: ")]
    assert len(ours) == 1 and ours[0].startswith(prefix), err
    others = [line for line in err.splitlines() if line.strip() and line != ours[0] and " INFO " not in line]
    assert not others, err
    return ours[0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bad_input_on_two_ranks_is_one_line_and_exit_2(tmp_path, demo_dir):
    # Every rank reads the config and finds the error: rank 0 alone says it.
    code, err = _finish(_launch(tmp_path, "--config", _config(tmp_path, demo_dir), "train.lr=-1"))
    assert code == 2, err
    line = _only_line(err, "msft-fast: error: ")
    assert line == "msft-fast: error: config key 'train.lr' must be a positive number, got -1.0"


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_and_exits_with_its_code(tmp_path, demo_dir, sig, code):
    out = tmp_path / "run"
    proc = _launch(tmp_path, "--config", _config(tmp_path, demo_dir))
    _wait_for_steps(proc, str(out), 3)
    proc.send_signal(sig)  # to the launcher, as a Ctrl-C or a scheduler's SIGTERM would
    got, err = _finish(proc)
    assert got == code, err
    line = _only_line(err, f"msft-fast: stopped by {sig.name} after step ")
    assert "; checkpoint in " in line and line.endswith("; rerun the same command to resume")
    checkpoint = line.split("; checkpoint in ")[1].split(";")[0]
    assert os.path.isfile(os.path.join(checkpoint, "meta.json"))  # complete: its meta is written last
    assert json.load(open(out / "history.json"))["status"] == "stopped"


def test_launch_arguments_go_through_torchrun_s_parser(capsys):
    args = parse_launch_args(["--nnodes", "1", "--nproc_per_node", "2", "--config", "c.yaml", "--overwrite",
                              "data.tasks[0].train=x.jsonl"])
    assert (args.nproc_per_node, args.module, args.training_script) == ("2", True, "msft_fast.train")
    assert args.training_script_args == ["--config", "c.yaml", "--overwrite", "data.tasks[0].train=x.jsonl"]
    # Time for the workers' checkpoint before the agent's SIGKILL, where torchrun has the option (not 2.8).
    from torch.distributed.run import get_args_parser

    has_option = any("--shutdown-timeout" in a.option_strings or "--shutdown_timeout" in a.option_strings
                     for a in get_args_parser()._actions)
    assert getattr(args, "shutdown_timeout", None) == (600 if has_option else None)
    from msft_fast.cli import main

    for argv, needle in ((["launch", "--nproc_per_node", "2"], "no --config given"),
                         (["launch", "--nproc-per-node", "2", "--bogus", "1", "--config", "c.yaml"],
                          "unrecognized arguments: --bogus")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("msft-fast: error: ") and needle in err[0], err


def test_worker_outcomes_map_to_the_documented_codes(capsys):
    def failures(*codes):
        return {rank: SimpleNamespace(exitcode=c, pid=100 + rank) for rank, c in enumerate(codes)}

    def first(f):
        return next(iter(f.items()))

    # Bad input: rank 0 printed the line; the agent then stopped the others (SIGTERM, -15).
    for codes in ((2, -15), (-15, 2), (2, 2)):
        assert _failure_code(failures(*codes), first(failures(*codes))) == 2
    assert _failure_code(failures(143, 143), first(failures(143, 143))) == 143
    assert _failure_code(failures(130, -15), first(failures(130, -15))) == 130
    assert capsys.readouterr().err == ""  # the workers said it all
    assert _failure_code(failures(-9, -15), first(failures(-9, -15))) == 137
    assert "rank 0 (pid 100) was killed by SIGKILL (out of memory?)" in capsys.readouterr().err
    assert _failure_code(failures(1, -15), first(failures(1, -15))) == 1
    assert "rank 0 (pid 100) exited with code 1; its output above says why" in capsys.readouterr().err


def test_signals_before_training_and_a_repeated_signal():
    """Before training a signal stops at once (143/130 with one line); during training the first
    one asks for a checkpoint, the same signal again within a second (a scheduler's copy to every
    process plus torchrun's forwarded one) does not cancel it, and another one later stops at once."""
    import time

    from msft_fast.errors import Interrupted, signal_exit_code
    from msft_fast.run import _stop_on_signals

    assert (signal_exit_code("SIGTERM"), signal_exit_code("SIGINT")) == (143, 130)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="^interrupted by SIGTERM before training started"):
        with _stop_on_signals([None]):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    trainer = SimpleNamespace(stop_signal=None)
    with _stop_on_signals([trainer]):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert trainer.stop_signal == "SIGTERM"  # one stop request, no Interrupted
        with pytest.raises(Interrupted, match=r"^interrupted by SIGINT \(a second signal, after SIGTERM\)"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
