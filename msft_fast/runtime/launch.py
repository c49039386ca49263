"""`msft-fast launch [torchrun options] --config FILE.yaml [--overwrite] [key=value ...]`: torchrun
with the exit codes and the one-line errors that `msft-fast train` promises.

Plain `torchrun ... -m msft_fast.train` works, but its elastic agent turns any worker failure into a
`ChildFailedError` report of some 40 lines and exit code 1, and a Ctrl-C or SIGTERM into a
`SignalException` traceback, also exit 1. This launcher runs the same agent in-process (every
torchrun option means what it means there: `--nproc_per_node`, `--nnodes`, `--rdzv_*`,
`--standalone`, ...) and maps its outcome to the documented codes: 2 when the run stopped on bad
input (rank 0 printed the one line), 130 after SIGINT and 143 after SIGTERM (the workers
checkpointed first), 128 + N for a worker killed by signal N; any other failure keeps its code,
with one line naming the rank. The agent's own log lines are held back unless LOGLEVEL is set.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from msft_fast.errors import UserError

# The workers checkpoint after SIGTERM/SIGINT: give them that long before the agent's SIGKILL
# (torchrun's default is 30 s, short for the checkpoint of a large model).
SHUTDOWN_TIMEOUT_S = 600
TRAIN_FLAGS = ("--config", "--overwrite")
USAGE = ("msft-fast launch [torchrun options] --config FILE.yaml [--overwrite] [key=value ...], "
         "e.g. msft-fast launch --nproc_per_node 8 --config my_run.yaml train.lr=1e-5")


class LaunchError(UserError):
    """The launcher's own command line is wrong."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_launch_args(argv)
    except UserError as e:
        print(f"msft-fast: error: {e}", file=sys.stderr, flush=True)
        return 2
    if args is None:  # --help
        return 0
    return run_workers(args)


def parse_launch_args(argv: list[str]) -> Optional[argparse.Namespace]:
    """torchrun's own parser over `[torchrun options] --module msft_fast.train [train arguments]`.
    The train arguments start at the first --config or --overwrite."""
    from torch.distributed import run as torchrun

    if any(a in ("-h", "--help") for a in argv[:_train_start(argv)]):
        print(f"usage: {USAGE}\n\n{__doc__}\ntorchrun options:")
        torchrun.get_args_parser().print_help()
        return None
    start = _train_start(argv)
    if start == len(argv):
        raise LaunchError(f"no --config given: {USAGE}")
    parser = torchrun.get_args_parser()

    def refuse(message: str) -> None:
        raise LaunchError(f"{message} (torchrun options come first, then --config FILE.yaml): {USAGE}")

    parser.error = refuse  # one line, like every other error, instead of argparse's usage block
    args = parser.parse_args([*argv[:start], "--module", "msft_fast.train", *argv[start:]])
    # Older torchrun (torch 2.8) has no --shutdown-timeout: its agent gives workers 30 s after a signal.
    if getattr(args, "shutdown_timeout", 0) is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    return args


def _train_start(argv: list[str]) -> int:
    return next((i for i, a in enumerate(argv) if a in TRAIN_FLAGS or a.startswith("--config=")), len(argv))


def run_workers(args: argparse.Namespace) -> int:
    """Run torchrun's agent with `args`; the exit code the workers' outcome maps to."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    quiet = "LOGLEVEL" not in os.environ
    if quiet:
        _hold_back_agent_logs()
    try:
        torchrun.run(args)
        return 0
    except ChildFailedError as e:
        return _failure_code(e.failures, e.get_first_failure())
    except SignalException as e:
        # The agent passed the signal on to the workers and waited for them: they wrote a
        # checkpoint and rank 0 said so in one line.
        return 128 + int(e.sigval)
    except KeyboardInterrupt:  # a Ctrl-C before the agent installed its handlers
        return 130
    except Exception as e:  # rendezvous failures and the like: one line, not the agent's traceback
        if not quiet:
            raise
        print(f"msft-fast: error: torchrun could not run the workers: {' '.join(str(e).split())[:500]}",
              file=sys.stderr, flush=True)
        return 1


def _failure_code(failures: dict, first: tuple) -> int:
    """Bad input on any rank wins (that rank, or rank 0 for all, printed the line); then a stop by
    signal after a checkpoint; else the first failure's code, said in one line."""
    codes = {rank: f.exitcode for rank, f in failures.items()}
    for wanted in (2, 143, 130):
        if wanted in codes.values():
            return wanted
    rank, failure = first
    if failure.exitcode < 0:
        name = _signal_name(-failure.exitcode)
        print(f"msft-fast: error: rank {rank} (pid {failure.pid}) was killed by {name}"
              + (" (out of memory?)" if name == "SIGKILL" else "")
              + "; rerun the same command to resume from the newest complete checkpoint",
              file=sys.stderr, flush=True)
        return 128 - failure.exitcode
    print(f"msft-fast: error: rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}; "
          "its output above says why", file=sys.stderr, flush=True)
    return failure.exitcode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _hold_back_agent_logs() -> None:
    """The agent logs every step of a shutdown as warnings and errors ('Sending process N closing
    signal', 'failed (exitcode: 2)'); the workers and this launcher already say what matters."""
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (create the agent's loggers)
    import torch.distributed.elastic.multiprocessing.api  # noqa: F401
    import torch.distributed.launcher.api  # noqa: F401

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":
    sys.exit(main())
