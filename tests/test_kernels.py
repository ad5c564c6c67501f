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
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
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
    assert host._cpu_linear is host._kernel_linear
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
