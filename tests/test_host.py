"""The CPU worker of hetegen_fx.host (the device emulated on "cpu"): jobs run in order, off the calling
thread, in the scripted (GIL-free) job server and in its Python fallback; errors reach the caller; the
wrap-safe counter compare the device uses; the ready-word wait without the GIL; jobs that run while the
posting thread holds the GIL (the deadlock the server exists for); a clean exit."""

from __future__ import annotations

import ctypes
import faulthandler
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import hetegen_fx.host as host_mod
from hetegen_fx.host import _CAPACITY, _FIELDS, HostWorker, _reached, _round_up, _scripted_server


@pytest.fixture(params=["scripted", "python"], autouse=True)
def job_loop(request, monkeypatch):
    """Every test runs with the TorchScript job server and with its Python fallback."""
    if request.param == "scripted":
        assert _scripted_server() is not None, "TorchScript should script the job server on this torch"
    else:
        monkeypatch.setattr(host_mod, "_SCRIPTED", [None])
    return request.param


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


def test_a_log_times_each_job_in_order(job_loop):
    """While a log is kept, each job gets (number, start, end) in perf_counter seconds: stamped by the job
    server itself where the CPU kernel's clock is built, else timed from Python."""
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    x, ws, bs, ref = _job(gen)
    host.end(host.begin(x, ws, bs), (3, 13), torch.float32)  # before the log: not in it
    host.log = []
    t0 = time.perf_counter()
    seqs = [host.begin(x, ws, bs) for _ in range(5)]
    for seq in seqs:
        torch.testing.assert_close(host.end(seq, (3, 13), torch.float32), ref)
    host.drain()
    t1 = time.perf_counter()
    log = host.log
    assert [entry[0] for entry in log] == seqs
    for _, start, end in log:
        assert t0 <= start <= end <= t1
    assert all(a[2] <= b[1] for a, b in zip(log, log[1:], strict=False))  # one job at a time
    if host_mod._now is host_mod._kernel_clock:  # the server stamped them (not the Python-timed path)
        assert host._stamps[seqs[-1] % host_mod._STAMPS, 0] == seqs[-1]
    assert host.log == log  # read again: nothing twice
    host.log = None
    seq = host.begin(x, ws, bs)
    host.end(seq, (3, 13), torch.float32)
    host.log = []
    host.drain()
    assert host.log == []  # jobs run while no log was kept are not in the next one


def test_the_log_goes_on_past_a_failed_job_and_keeps_what_ran_before_it_was_replaced(job_loop):
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(8)
    x, ws, bs, _ = _job(gen)
    first = []
    host.log = first
    a = host.begin(x, ws, bs)
    bad = host.begin(torch.randn(3, 31), ws, bs)  # fails on the worker: done, without stamps
    b = host.begin(x, ws, bs)
    host.end(a, (3, 13), torch.float32)
    with pytest.raises(RuntimeError, match="CPU part failed"):
        host.end(bad, (3, 13), torch.float32)
    host.end(b, (3, 13), torch.float32)
    host.drain()
    assert [e[0] for e in host.log] == [a, b]
    c = host.begin(x, ws, bs)
    host.end(c, (3, 13), torch.float32)
    host.drain()
    host.log = []  # replaced without being read: what ran went into the old list
    assert [e[0] for e in first] == [a, b, c]
    host.log = None


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
    assert all(host.is_done(s) for s in seqs)
    host.drain()
    assert host._pending == {}


def test_counter_compare_wraps_like_the_drivers_geq():
    word = ctypes.c_uint32(5)
    assert _reached(word, 5) and _reached(word, 4) and not _reached(word, 6)
    word.value = 2  # the counter wrapped past 2**32
    assert _reached(word, 0xFFFFFFF0) and not _reached(word, 3)


def test_buffer_sizes_round_up_to_powers_of_two():
    assert _round_up(1) == 4096 and _round_up(4096) == 4096 and _round_up(4097) == 8192


def test_jobs_queued_together_run_together_and_a_failure_stays_with_its_job():
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    good = [_job(gen) for _ in range(4)]
    seqs = [host.begin(*good[0][:3]), host.begin(*good[1][:3])]
    bad = host.begin(torch.randn(3, 31), good[0][1], good[0][2])  # fails in the middle of a batch
    seqs += [host.begin(*good[2][:3]), host.begin(*good[3][:3])]
    for seq, (x, _, _, ref) in zip(seqs[:2], good[:2], strict=True):
        torch.testing.assert_close(host.end(seq, (3, 13), x.dtype), ref)
    with pytest.raises(RuntimeError, match="CPU part failed on the worker thread"):
        host.end(bad, (3, 13), torch.float32)
    for seq, (x, _, _, ref) in zip(seqs[2:], good[2:], strict=True):
        torch.testing.assert_close(host.end(seq, (3, 13), x.dtype), ref)


def test_the_scripted_server_waits_for_the_ready_word_without_the_gil(job_loop):
    """What the device's "ready" write does on CUDA, done here by a thread: the job must not start before
    the word reaches its number, and the spin must leave the GIL to other threads."""
    if job_loop != "scripted":
        pytest.skip("the Python fallback pauses in Python (covered by the GPU tests)")
    server = _scripted_server()
    words = torch.zeros(2, dtype=torch.int32)
    ready = ctypes.c_uint32.from_address(words.data_ptr())
    x, ws, bs, ref = _job(torch.Generator().manual_seed(6))
    desc = torch.zeros(_CAPACITY, _FIELDS, dtype=torch.int64)
    desc[0] = torch.tensor([7, 0, 0, 0, 3, 32, 0])  # job 7: site 0, buffers 0, 3 rows of 32, a plain job
    counters = torch.tensor([1, 0, 0, 0])  # one descriptor posted, none read
    out = torch.zeros(64)
    progress, flipped = [0], []

    def device():  # counts in Python while the server spins, then marks job 7 ready
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:
            progress[0] += 1
        flipped.append(time.perf_counter())
        ready.value = 7

    faulthandler.dump_traceback_later(120, exit=True)  # a server holding the GIL would hang: fail instead
    try:
        t = threading.Thread(target=device)
        t.start()
        stamps = torch.zeros(8, 3, dtype=torch.int64)
        reason = server(
            desc, counters, words, stamps, [ws], [bs], [x.flatten()], [out], 5, True, 10, 1, False, True, True
        )
        returned = time.perf_counter()
        t.join()
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert reason == 2 and returned > flipped[0] and int(words[1]) == 7  # ran after "ready", wrote "done"
    assert counters.tolist() == [1, 1, 5, 5]  # read one descriptor; entered and serving with its tables
    if host_mod._now is host_mod._kernel_clock:  # stamped with the CPU kernel's clock
        assert stamps[7, 0] == 7 and flipped[0] * 1e9 <= stamps[7, 1] <= stamps[7, 2] <= returned * 1e9
    else:  # no kernel, no clock: the row holds zeros for the times
        assert stamps[7].tolist() == [7, 0, 0]
    torch.testing.assert_close(out[:39].view(3, 13), ref)
    assert progress[0] > 1000  # the other thread ran while the server waited: the GIL was free


def test_a_job_runs_while_the_posting_thread_holds_the_gil(job_loop):
    """The deadlock the server exists for: on CUDA the launching thread can block in a driver call with the
    GIL held (a full launch queue) while the device waits for a job. Here it holds the GIL in a C call for
    half a second right after posting: the job must be done by then."""
    if job_loop != "scripted":
        pytest.skip("the Python fallback needs the GIL between jobs (see hetegen_fx.host)")
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(8)
    x, ws, bs, ref = _job(gen)
    host.end(host.begin(x, ws, bs), (3, 13), x.dtype)  # the server runs with these weights' tables
    seq = host.begin(x, ws, bs)
    ctypes.PyDLL(None).usleep(500_000)  # PyDLL: the GIL stays held during the call
    assert host.is_done(seq)
    torch.testing.assert_close(host.end(seq, (3, 13), x.dtype), ref)


def test_tables_grow_and_the_ring_wraps_while_jobs_are_queued():
    """New weights and larger buffers mid-stream make a new server generation; more jobs than the ring
    holds go through it in order."""
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(9)
    sites = [_job(gen)[1:3] for _ in range(3)]
    done = 0
    while done < _CAPACITY + 200:
        batch = []
        for i in range(37):
            ws, bs = sites[(done + i) % 3]
            x = torch.randn((done + i) % 5 + 1 + (40 if i == 20 else 0), 32, generator=gen)
            ref = torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs, strict=True)], -1)
            batch.append((host.begin(x, ws, bs), x, ref))
        for seq, x, ref in batch:
            torch.testing.assert_close(host.end(seq, (x.shape[0], 13), x.dtype), ref)
        done += len(batch)
    assert host._seq == done and host._counter_mem[1] > _CAPACITY  # the tail went round the ring


def test_a_program_exits_cleanly_right_after_a_job():
    """The server spins without the GIL for a while after its last job; a thread that returns from such a
    call while the interpreter finalizes would abort the process, so the worker is brought back at exit."""
    import subprocess
    import sys

    code = (
        "import torch\nfrom hetegen_fx.host import HostWorker\n"
        "h = HostWorker(torch.device('cpu'))\nx = torch.randn(2, 8)\n"
        "print(h.end(h.begin(x, [torch.randn(4, 8)], [None]), (2, 4), x.dtype).shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "torch.Size([2, 4])" in r.stdout, r.stderr[-2000:]


def test_call_runs_on_the_worker_after_the_queued_jobs_and_returns_or_raises():
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    seq = host.begin(*_job(gen)[:3])
    seen = host.call(lambda: (threading.current_thread(), host.is_done(seq)))
    assert seen == (host._thread, True)  # on the worker, and only once the job before it had run
    with pytest.raises(ZeroDivisionError):
        host.call(lambda: 1 / 0)
    assert host.call(lambda: 3) == 3  # the worker survives a failing call


@pytest.mark.parametrize(("cores", "threads"), [(16, 12), (8, 6), (4, 2), (2, 1), (1, 1)])
def test_default_threads_leave_cores_to_the_launching_thread(monkeypatch, cores, threads, job_loop):
    if job_loop != "scripted":
        pytest.skip("independent of the job server")
    monkeypatch.setattr(host_mod.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert host_mod.default_threads() == threads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_jobs_linears_together_or_one_by_one_give_the_same_bits(dtype):
    """``HostWorker.together`` (one kernel call for a job's Linears, the default) and one call each agree."""
    host = HostWorker(torch.device("cpu"))
    gen = torch.Generator().manual_seed(8)
    x, ws, bs, _ = _job(gen, rows=2)
    x, ws, bs = x.to(dtype), [w.to(dtype) for w in ws], [None if b is None else b.to(dtype) for b in bs]
    ys = []
    for together in (True, False):
        host.together = together
        host.drain()
        host.call(lambda: None)  # the server leaves; the next job enters it with the new setting
        ys.append(host.end(host.begin(x, ws, bs), (2, 13), dtype))
    assert host.together is False
    assert torch.equal(ys[0], ys[1])
    torch.testing.assert_close(
        ys[0].float(), torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs, strict=True)], -1).float()
    )


def test_one_call_per_job_can_be_switched_off():
    import os
    import subprocess
    import sys

    code = "import torch; from hetegen_fx.host import HostWorker; print(HostWorker(torch.device('cpu')).together)"
    env = {k: v for k, v in os.environ.items() if k != "HETEGEN_FUSED_JOBS"}
    runs = [
        subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
        for e in (env, {**env, "HETEGEN_FUSED_JOBS": "0"})
    ]
    assert [r.stdout.strip() for r in runs] == ["True", "False"], [r.stderr[-500:] for r in runs]
