"""`msft-fast ...` in child processes forked from a server that has imported torch, transformers and
msft_fast once (multiprocessing's forkserver), so a test can start, kill and rerun many short runs
for the price of one interpreter start-up (about 6 s each otherwise).

Each child is a real, separate process that nothing is shared with: it can be SIGKILLed (by the
fault injection of msft_fast/runtime/fault_injection.py, or from outside), and its stdout and stderr go
to a log file, as a user's terminal would show them.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        # The server imports these once; every child starts from that state.
        _context.set_forkserver_preload(["forked_cli", "msft_fast.cli", "msft_fast.run"])
    return _context


def _child(argv: list[str], log_path: str, env: dict[str, str]) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    from msft_fast.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit handlers: they belong to the server's state, not to this run


@dataclass
class Finished:
    exitcode: int  # -9: killed by SIGKILL
    log: str  # stdout and stderr


def start(argv: Sequence[str], log_path, env: Optional[dict[str, str]] = None):
    """Start `msft-fast ARGV` in a forked child; returns the multiprocessing.Process."""
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    proc = _forkserver().Process(target=_child, args=(list(argv), str(log_path), env))
    proc.start()
    return proc


def wait(proc, log_path, timeout: float = 300) -> Finished:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"the run did not end within {timeout} s: {_read(log_path)[-3000:]}")
    return Finished(proc.exitcode, _read(log_path))


def run(argv: Sequence[str], log_path, env: Optional[dict[str, str]] = None, timeout: float = 300) -> Finished:
    """Run `msft-fast ARGV` in a forked child to its end (or its death)."""
    return wait(start(argv, log_path, env), log_path, timeout)


def _read(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
