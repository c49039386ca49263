"""Who does what in a group of ranks: the first rank of each node fills that node's caches (Hub
downloads, tokenization) while the node's other ranks wait, nodes work at the same time, an error
on any node stops every rank with its message; only rank 0 starts the experiment trackers.

Three threads stand for three ranks on two nodes (ranks 0 and 1 on node A, rank 2 on node B),
with the two collectives run.py uses played by a barrier (real gloo groups run the same code
in test_distributed and test_launch; here the order of events is what is checked)."""
from __future__ import annotations

import os
import threading
import time

import torch

from msft_fast import run
from msft_fast.config import load_config
from msft_fast.runtime.distributed import DistContext
from msft_fast.errors import DataError, UserError
from msft_fast.state.history import History

LOCAL_RANKS = (0, 1, 0)
NODE_WORK_S = 0.3  # what a first rank spends filling its node's cache


class _Group:
    """all_gather_object / broadcast_object among threads, each knowing its rank."""

    def __init__(self, world: int):
        self.barrier, self.slots, self.me = threading.Barrier(world), [None] * world, threading.local()

    def all_gather_object(self, obj):
        self.barrier.wait()
        self.slots[self.me.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def broadcast_object(self, obj, src: int = 0):
        return self.all_gather_object(obj)[src]


def _on_ranks(monkeypatch, fn) -> list:
    group = _Group(len(LOCAL_RANKS))
    monkeypatch.setattr(run, "all_gather_object", group.all_gather_object)
    monkeypatch.setattr(run, "broadcast_object", group.broadcast_object)
    results: list = [None] * len(LOCAL_RANKS)

    def body(rank):
        group.me.rank = rank
        ctx = DistContext(rank, len(LOCAL_RANKS), LOCAL_RANKS[rank], torch.device("cpu"))
        try:
            results[rank] = fn(ctx)
        except UserError as e:
            results[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(len(LOCAL_RANKS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_the_first_rank_of_each_node_fills_its_cache_while_the_others_wait(tmp_path, monkeypatch):
    def fill_cache(ctx):
        node = tmp_path / ("node-A" if ctx.rank < 2 else "node-B")

        def work():
            start, marker = time.monotonic(), node / "downloaded"
            found = marker.exists()
            if not found:
                time.sleep(NODE_WORK_S)
                node.mkdir(exist_ok=True)
                marker.touch()
            return found, start, time.monotonic()

        return run._agreed(ctx, work, main_first=True)

    r = _on_ranks(monkeypatch, fill_cache)
    assert [found for found, _, _ in r] == [False, True, False]  # rank 1 reused what rank 0 fetched
    assert r[1][1] >= r[0][2]  # rank 1 started after its node's first rank finished
    assert r[2][1] < r[0][2]  # node B did not wait for node A


def test_an_error_on_one_node_stops_every_rank_with_its_message(monkeypatch):
    def fail_on_node_b(ctx):
        def work():
            if ctx.rank == 2:
                raise DataError("disk full on node B")

        return run._agreed(ctx, work, main_first=True)

    r = _on_ranks(monkeypatch, fail_on_node_b)
    assert [str(e) for e in r] == ["on rank 2: disk full on node B"] * 3
    assert all(isinstance(e, DataError) and e.all_ranks for e in r)


def test_only_rank_0_starts_the_trackers(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    cfg = load_config(None, [f"output_dir={out}", "data.tasks=[{name: t, train: t.jsonl, val_fraction: 0.1}]",
                             "train.report_to=[tensorboard]"])

    def start(ctx):
        trackers = run.start_trackers(ctx, cfg, out, History(out, "sft", ["t"], {}, {}), 0)
        opened = len(trackers.trackers)
        trackers.close()
        return opened

    assert _on_ranks(monkeypatch, start) == [1, 0, 0]
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1  # one event file: rank 0's
