"""The CPU worker of hetegen_fx.host (the device emulated on "cpu"): jobs run in order, off the calling
thread; errors reach the caller; the wrap-safe counter compare the device uses."""

from __future__ import annotations

import ctypes
import threading

import pytest
import torch
import torch.nn.functional as F

from hetegen_fx.host import HostWorker, _reached, _round_up


def _job(gen: torch.Generator, rows: int = 3):
    x = torch.randn(rows, 32, generator=gen)
    ws = [torch.randn(8, 32, generator=gen), torch.randn(5, 32, generator=gen)]
    bs = [torch.randn(8, generator=gen), None]
    ref = torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs, strict=True)], -1)
    return x, ws, bs, ref


def test_jobs_run_in_order_on_the_worker_thread():
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    jobs = [_job(gen, rows) for rows in (1, 4, 7)]
    seqs = [host.begin(x, ws, bs) for x, ws, bs, _ in jobs]  # all queued before any is collected
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    host.log = []
    for seq, (x, _, _, ref) in zip(seqs, jobs, strict=True):
        y = host.end(seq, (*x.shape[:-1], 13), x.dtype)
        torch.testing.assert_close(y, ref)
    assert host._thread is not None and host._thread is not threading.current_thread()
    assert host._thread.daemon
    with pytest.raises(RuntimeError, match="never started or was already collected"):
        host.end(seqs[0], (1, 13), torch.float32)


def test_a_failing_job_raises_at_its_end_and_not_later():
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    x, ws, bs, _ = _job(gen)
    bad = host.begin(torch.randn(3, 31), ws, bs)  # wrong in_features: fails on the worker
    with pytest.raises(RuntimeError, match="CPU part failed on the worker thread"):
        host.end(bad, (3, 13), torch.float32)
    seq = host.begin(x, ws, bs)  # the error was reported once: the next job is unaffected
    assert host.end(seq, (3, 13), torch.float32).shape == (3, 13)


def test_an_orphaned_failure_does_not_leak_into_the_next_call():
    """A graph call that fails on the launching thread leaves its job uncollected: that job's error
    belongs to the failed call, not to the next one."""
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    x, ws, bs, ref = _job(gen)
    host.begin(torch.randn(3, 31), ws, bs)  # fails, and nobody collects it
    host.wait_all()
    seq = host.begin(x, ws, bs)
    torch.testing.assert_close(host.end(seq, (3, 13), torch.float32), ref)
    assert host._pending == {}  # the orphan was dropped


def test_wait_all_returns_once_every_job_ran():
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    seqs = [host.begin(*_job(gen)[:3]) for _ in range(4)]
    host.wait_all()
    assert all(host._pending[s].done.is_set() for s in seqs)
    host.drain()
    assert host._pending == {}


def test_counter_compare_wraps_like_the_drivers_geq():
    word = ctypes.c_uint32(5)
    assert _reached(word, 5) and _reached(word, 4) and not _reached(word, 6)
    word.value = 2  # the counter wrapped past 2**32
    assert _reached(word, 0xFFFFFFF0) and not _reached(word, 3)


def test_buffer_sizes_round_up_to_powers_of_two():
    assert _round_up(1) == 4096 and _round_up(4096) == 4096 and _round_up(4097) == 8192
