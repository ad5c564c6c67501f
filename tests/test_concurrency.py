"""Compiled models called from several threads, and interrupted: every output is eager's, nothing hangs, and
the process exits cleanly.

The model (hetegen_fx.runtime.DeviceRuntime.lock): every call of a compiled graph, every compile and every
change to a device's staging arena or CPU worker hold that device's lock, so calls from several threads, to
one model or to several, run one after the other. Before it, two threads calling one model hung or got
"CPU job N was never started", and two threads with two models got a fifth of their outputs wrong (the
worker's job ring and the staging arena mixed the callers' jobs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

import hetegen_fx

CALLS = 300  # per thread: the failure showed in every run at this count


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()


def _hammer(pairs: list[tuple[nn.Module, nn.Module]], calls: int = CALLS) -> tuple[list, list, list[bool]]:
    """Each (compiled, eager) pair called from its own thread ``calls`` times on fresh random inputs; the
    outputs that differ from eager, the errors, and which threads were still running after the timeout."""
    wrong, errors = [], []

    def run(compiled, model, seed):
        g = torch.Generator().manual_seed(seed)
        for i in range(calls):
            x = torch.randn(2, 256, generator=g)
            try:
                with torch.no_grad():
                    if not torch.allclose(compiled(x), model(x), rtol=1e-4, atol=1e-4):
                        wrong.append((seed, i))
            except Exception as e:  # noqa: BLE001  (counted, reported by the assertion)
                errors.append(repr(e)[:200])

    threads = [threading.Thread(target=run, args=(c, m, k), daemon=True) for k, (c, m) in enumerate(pairs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return wrong, errors, [t.is_alive() for t in threads]


def test_two_threads_calling_one_compiled_model_get_eagers_outputs():
    model = _mlp(0)
    compiled = hetegen_fx.compile(model, gpu_memory="400KiB", device="cpu")
    assert any(not lp.resident for lp in compiled.plan.layers)
    wrong, errors, alive = _hammer([(compiled, model), (compiled, model)])
    assert not any(alive), "a thread hung"
    assert not errors and not wrong, (errors[:3], len(wrong))


def test_two_threads_with_two_compiled_models_get_eagers_outputs():
    a, b = _mlp(0), _mlp(1)
    ca = hetegen_fx.compile(a, gpu_memory="400KiB", device="cpu")
    cb = hetegen_fx.compile(b, gpu_memory="400KiB", device="cpu")
    wrong, errors, alive = _hammer([(ca, a), (cb, b)])
    assert not any(alive), "a thread hung"
    assert not errors and not wrong, (errors[:3], len(wrong))


def test_two_threads_generating_with_one_compiled_hf_copy(tiny_hf):
    model = tiny_hf("llama")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    compiled = hetegen_fx.compile(model, gpu_memory=int(nbytes * 0.6), device="cpu", max_seq_len=64)
    prompts = [torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    kw = {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        refs = [model.generate(p, **kw) for p in prompts]
    wrong, errors = [], []

    def run(k):
        for r in range(6):
            j = (k + r) % len(prompts)
            try:
                with torch.no_grad():  # the first calls of both threads compile at the same time
                    if not torch.equal(compiled.generate(prompts[j], **kw), refs[j]):
                        wrong.append((k, r))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e)[:200])

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors and not wrong, (errors[:3], wrong)


_CHILD = textwrap.dedent(
    """
    import signal, sys, time, torch, hetegen_fx
    from torch import nn
    # Ctrl-C as a program started from a shell gets it: Python raises KeyboardInterrupt only where SIGINT was
    # not ignored when it started, and this process inherits its disposition from the test run's
    print("SIGINT at start:", signal.getsignal(signal.SIGINT), file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512)).eval()
    compiled = hetegen_fx.compile(model, gpu_memory="2MiB", device="cpu", prefetch=1)
    x = torch.randn(8, 512)
    with torch.no_grad():
        ref = model(x)
    catch = sys.argv[1] == "catch"
    print("ready", flush=True)
    interrupts, start = 0, time.monotonic()
    while interrupts < 3 and time.monotonic() - start < 60:
        try:
            with torch.no_grad():
                while True:
                    compiled(x)
        except KeyboardInterrupt:
            if not catch:
                raise
            interrupts += 1
    with torch.no_grad():  # the runtime is still usable after the interrupts
        ok = all(torch.allclose(compiled(x), ref, rtol=1e-4, atol=1e-4) for _ in range(20))
    print("interrupts", interrupts, "ok", ok, flush=True)
    sys.exit(0 if ok and interrupts == 3 else 3)
    """
)


def _interrupted(mode: str, signals: int) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        for _ in range(signals):
            time.sleep(0.3)
            if p.poll() is not None:
                break
            p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"the interrupted process did not end within 90 s:\n{out[-1000:]}\n{err[-2000:]}")
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out, err


def test_interrupts_during_calls_leave_the_runtime_usable_and_the_process_exits_cleanly():
    code, out, err = _interrupted("catch", 3)
    assert code == 0, (out, err[-2000:])
    assert "interrupts 3 ok True" in out
    assert "terminate called" not in err and "Aborted" not in err


def test_an_uncaught_interrupt_ends_the_process_as_python_does():
    code, out, err = _interrupted("raise", 1)
    assert code in (-signal.SIGINT, 130), (code, err[-2000:])  # Python re-raises SIGINT on an uncaught one
    assert "KeyboardInterrupt" in err
    assert "terminate called" not in err and "Aborted" not in err and "Segmentation" not in err
