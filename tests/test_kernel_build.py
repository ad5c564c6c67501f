"""The CPU kernel's build lock (hetegen_fx.kernels.clear_stale_lock): torch waits without end while a build
lock exists, so one left by an interrupted build must not hang every later process; a build under way in
another process is waited for."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hetegen_fx import kernels


@pytest.fixture
def lock(tmp_path, monkeypatch) -> Path:
    """The lock file path of a build folder under a temporary TORCH_EXTENSIONS_DIR (the file not created)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory("hetegen_lock_test", verbose=False)) / "lock"


def test_no_lock_returns_at_once(lock):
    said = []
    t0 = time.perf_counter()
    assert kernels.clear_stale_lock("hetegen_lock_test", said.append) is False
    assert time.perf_counter() - t0 < 1.0 and said == []


def test_a_lock_left_by_an_interrupted_build_is_removed_with_a_warning(lock):
    lock.touch()
    old = time.time() - kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="did not finish"):
        assert kernels.clear_stale_lock("hetegen_lock_test") is True
    assert not lock.exists()


def test_a_build_under_way_elsewhere_is_waited_for(lock):
    lock.touch()
    said = []
    done = threading.Timer(0.4, lock.unlink)  # the other process finishes its build
    done.start()
    t0 = time.perf_counter()
    try:
        assert kernels.clear_stale_lock("hetegen_lock_test", said.append, poll_s=0.05) is False
    finally:
        done.join()
    assert time.perf_counter() - t0 >= 0.35
    assert len(said) == 1 and "waiting for another process" in said[0] and str(lock) in said[0]


def test_a_lock_that_grows_stale_while_waited_for_is_removed(lock, monkeypatch):
    monkeypatch.setattr(kernels, "STALE_LOCK_S", 0.3)
    lock.touch()
    with pytest.warns(RuntimeWarning, match="did not finish"):
        assert kernels.clear_stale_lock("hetegen_lock_test", poll_s=0.05) is True
    assert not lock.exists()
