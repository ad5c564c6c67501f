"""hetegen_cpu::linear, the CPU parts' GEMV kernel (hetegen_fx/csrc/gemv.cpp): built on first use, exact to
fp32 accumulation against an fp64 reference, falls back to torch outside its shapes, and is what the job
server and the profiler run."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from hetegen_fx import host, kernels

pytestmark = pytest.mark.skipif(
    not kernels.load(), reason="no C++ compiler: the CPU parts use torch's kernel"
)


def _ref(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("out_f", "in_f"), [(64, 4096), (37, 100), (5, 16), (3, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64_reference(dtype, rows, out_f, in_f, bias):
    g = torch.Generator().manual_seed(rows * 1000 + out_f + in_f)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(2, rows, in_f, generator=g).to(dtype)[:1]  # a leading batch dimension, not contiguous
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    y = torch.ops.hetegen_cpu.linear(x, w, b)
    ref = _ref(x, w, b)
    assert y.dtype == dtype and y.shape == ref.shape == (1, rows, out_f)
    # fp32 accumulation: the only error is the final rounding to the weights' dtype
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    assert ((y.double() - ref).abs() <= tol * ref.abs() + 1e-3).all()


def test_rows_of_a_weight_view_and_thread_counts():
    w = torch.randn(256, 512, dtype=torch.float16)
    part = w[40:200]  # the CPU part of a split Linear: a view of rows
    x = torch.randn(1, 512, dtype=torch.float16)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(torch.ops.hetegen_cpu.linear(x, part, None))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])  # each row's sum is computed by one thread, in one order
    assert torch.equal(outs[0], torch.ops.hetegen_cpu.linear(x, part.contiguous(), None))


@pytest.mark.parametrize(
    ("x", "w"),
    [
        (torch.randn(5, 64, dtype=torch.float16), torch.randn(8, 64, dtype=torch.float16)),  # 5 rows: a GEMM
        (torch.randn(1, 64), torch.randn(8, 64)),  # fp32
    ],
)
def test_other_shapes_and_dtypes_go_to_torch(x, w):
    assert torch.equal(torch.ops.hetegen_cpu.linear(x, w, None), F.linear(x, w))


def test_bad_shapes_give_clear_errors():
    """Errors, not crashes: the messages' numbers are formatted without an ostream (on the GPU host, formatting
    a number with one in an extension built there ended the process)."""
    with pytest.raises(RuntimeError, match="weight must be 2-D, got 1-D"):
        torch.ops.hetegen_cpu.linear(
            torch.randn(1, 8, dtype=torch.float16), torch.randn(8, dtype=torch.float16)
        )
    with pytest.raises(RuntimeError):  # a 0-d input: torch's own error
        torch.ops.hetegen_cpu.linear(
            torch.tensor(1.0, dtype=torch.float16), torch.randn(4, 1, dtype=torch.float16)
        )
    with pytest.raises(RuntimeError, match="x has 8 features, weight 9"):
        torch.ops.hetegen_cpu.linear(
            torch.randn(1, 8, dtype=torch.float16), torch.randn(4, 9, dtype=torch.float16)
        )


def test_the_job_server_and_the_profiler_run_it():
    host._scripted_server()
    assert host._cpu_linear is host._kernel_linear and host._cpu_linears is host._kernel_linears
    assert kernels.cpu_linear() is torch.ops.hetegen_cpu.linear


def test_its_clock_is_the_one_perf_counter_reads():
    """The job server stamps jobs with ``hetegen_cpu::now``; timelines put them beside perf_counter times."""
    before = time.perf_counter_ns()
    now = torch.ops.hetegen_cpu.now()
    after = time.perf_counter_ns()
    assert before <= now <= after
    host._scripted_server()
    assert host._now is host._kernel_clock


def test_it_can_be_switched_off():
    code = "from hetegen_fx import kernels; import torch.nn.functional as F; assert kernels.cpu_linear() is F.linear"
    env = {**os.environ, "HETEGEN_CPU_KERNEL": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def _parts(dtype, gen):
    """A job's CPU parts: rows of three weights (views), one transposed (a Conv1D's columns), some biases."""
    q, k = torch.randn(96, 64, generator=gen).to(dtype), torch.randn(40, 64, generator=gen).to(dtype)
    conv = torch.randn(64, 23, generator=gen).to(dtype)  # [in, out]: its CPU part is a transposed view
    ws = [q[:70], k[:33], conv.t()]
    bs = [torch.randn(70, generator=gen).to(dtype), None, torch.randn(23, generator=gen).to(dtype)]
    return ws, bs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_a_jobs_linears_in_one_call_equal_one_call_each(dtype, rows):
    """``linears`` (one OpenMP team for the job, written in place) gives the bits of ``linear`` called per
    weight: each row is summed by one thread in one order. Six rows (a prefill) go to torch per weight."""
    g = torch.Generator().manual_seed(rows)
    ws, bs = _parts(dtype, g)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    each = torch.cat([torch.ops.hetegen_cpu.linear(x, w, b) for w, b in zip(ws, bs, strict=True)], -1)
    out = torch.full((rows, 126), float("nan"), dtype=dtype)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out.fill_(float("nan"))
            torch.ops.hetegen_cpu.linears(x, ws, bs, out)
            assert torch.equal(out, each), threads
    finally:
        torch.set_num_threads(before)
    ref = torch.cat([_ref(x, w, b) for w, b in zip(ws, bs, strict=True)], -1)
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    assert ((out.double() - ref).abs() <= tol * ref.abs() + 1e-2).all()


def test_a_jobs_linears_outside_the_kernel_go_to_torch():
    g = torch.Generator().manual_seed(9)
    ws, bs = _parts(torch.float32, g)
    x = torch.randn(2, 64, generator=g)
    out = torch.empty(2, 126)
    torch.ops.hetegen_cpu.linears(x, ws, bs, out)
    torch.testing.assert_close(out, torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs, strict=True)], -1))


def test_a_jobs_linears_check_their_shapes():
    x = torch.randn(1, 8, dtype=torch.float16)
    w = torch.randn(4, 8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="out has 5 columns, the weights 4 rows"):
        torch.ops.hetegen_cpu.linears(x, [w], [None], torch.empty(1, 5, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"x has 8 features, a weight is \[4, 9\]"):
        torch.ops.hetegen_cpu.linears(x, [torch.randn(4, 9, dtype=torch.float16)], [None], torch.empty(1, 4))
    with pytest.raises(RuntimeError, match="1 weights and 2 biases"):
        torch.ops.hetegen_cpu.linears(x, [w], [None, None], torch.empty(1, 4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"got \[8\] and \[1, 4\]"):
        torch.ops.hetegen_cpu.linears(x[0], [w], [None], torch.empty(1, 4, dtype=torch.float16))
