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


# The build folder's key (hetegen_fx.kernels.build_key): two installs of the package on one machine must each
# keep their own build (torch's loader keeps one per folder, and its ninja build compiles again whenever the
# build command, the source's path included, changes), and the same source installed twice must share one.


@pytest.fixture
def ext_dir(tmp_path, monkeypatch) -> Path:
    """A temporary TORCH_EXTENSIONS_DIR."""
    root = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def _install(root: Path, text: str | None = None) -> Path:
    """A copy of the kernel's source in an install of the package at ``root`` (its text changed if given)."""
    src = root / "hetegen_fx" / "csrc" / "gemv.cpp"
    src.parent.mkdir(parents=True)
    src.write_text(kernels._SOURCE.read_text() if text is None else text)
    return src


def test_the_key_follows_the_source_text_not_the_install_path(tmp_path):
    a, same, other = (
        _install(tmp_path / "a"),
        _install(tmp_path / "b"),
        _install(tmp_path / "c", kernels._SOURCE.read_text() + "// changed\n"),
    )
    assert kernels.build_key(a) == kernels.build_key(same) == kernels.build_key(kernels._SOURCE)
    assert kernels.build_key(other) != kernels.build_key(a)
    assert kernels.build_key_parts(a) == kernels.build_key_parts(same)
    assert not any(str(tmp_path) in v for v in kernels.build_key_parts(a).values())


@pytest.mark.parametrize(
    "change",
    [
        "cflags",
        "ldflags",
        "compiler",
        "torch version",
        "torch git",
        "torch abi",
        "torch dir",
        "python",
        "cpu",
    ],
)
def test_the_key_follows_what_changes_the_build(change, monkeypatch):
    import torch

    before = kernels.build_key()
    if change == "cflags":
        monkeypatch.setattr(kernels, "CFLAGS", (*kernels.CFLAGS, "-DHETEGEN_X=1"))
    elif change == "ldflags":
        monkeypatch.setattr(kernels, "LDFLAGS", ())
    elif change == "compiler":
        monkeypatch.setenv("CXX", "hetegen-no-such-compiler++")
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "torch git":
        monkeypatch.setattr(torch.version, "git_version", "0" * 40)
    elif change == "torch abi":
        abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 0)
        monkeypatch.setattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", not abi, raising=False)
    elif change == "torch dir":
        monkeypatch.setattr(torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
    elif change == "python":
        monkeypatch.setattr(
            kernels.sysconfig, "get_path", lambda name, *a, **k: "/elsewhere/include/python3.99"
        )
    elif change == "cpu":
        monkeypatch.setattr(kernels, "_cpu_tag", lambda: "another-cpu")
    assert kernels.build_key() != before


def test_the_key_is_stable():
    assert kernels.build_key() == kernels.build_key()
    assert len(kernels.build_key()) == 16


class _Ninja:
    """torch.utils.cpp_extension.load without a compiler, deciding as its ninja build does: a folder's library
    is compiled again when it is missing, when the build command (the sources' paths, the flags) differs from the
    one that built it, or when a source is newer than it."""

    def __init__(self):
        self.builds: list[str] = []
        self.calls: list[dict] = []

    def __call__(self, *, name, sources, extra_cflags, extra_ldflags, **kwargs):
        from torch.utils import cpp_extension

        self.calls.append(dict(name=name, sources=sources))
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        lib, cmd = folder / f"{name}.so", folder / "command"
        command = repr((sources, extra_cflags, extra_ldflags))
        if (
            not lib.exists()
            or not cmd.exists()
            or cmd.read_text() != command
            or any(os.stat(s).st_mtime_ns > lib.stat().st_mtime_ns for s in sources)
        ):
            self.builds.append(name)
            cmd.write_text(command)
            lib.write_text(Path(sources[0]).read_text())  # the "library": what it was built from
        return None


@pytest.fixture
def ninja(ext_dir, monkeypatch) -> _Ninja:
    from torch.utils import cpp_extension

    fake = _Ninja()
    monkeypatch.setattr(cpp_extension, "load", fake)
    return fake


def test_two_installs_keep_their_own_builds(tmp_path, ext_dir, ninja):
    """Switching between two installs with different sources builds each once; both builds stay."""
    a = _install(tmp_path / "a")
    b = _install(tmp_path / "b", kernels._SOURCE.read_text() + "// another version\n")
    names = [kernels._compile(source=s) for s in (a, b, a, b, a)]
    assert names[0] != names[1] and names == [names[0], names[1]] * 2 + [names[0]]
    assert ninja.builds == names[:2]  # once each: neither evicts the other
    folders = sorted(p.name for p in ext_dir.rglob("hetegen_cpu_gemv_*") if p.is_dir())
    assert folders == sorted(names[:2])
    for name, src in zip(names[:2], (a, b), strict=True):
        (folder,) = ext_dir.rglob(name)
        assert (folder / f"{name}.so").read_text() == src.read_text()
        assert (folder / "gemv.cpp").read_text() == src.read_text()  # the copy it compiles
    assert not list(ext_dir.rglob("*.tmp"))


def test_the_same_source_in_two_places_shares_one_build(tmp_path, ext_dir, ninja):
    here, there = _install(tmp_path / "venv1"), _install(tmp_path / "venv2")
    names = [kernels._compile(source=s) for s in (here, there, here)]
    assert len(set(names)) == 1 and len(ninja.builds) == 1
    # what ninja is given does not name either install
    assert ninja.calls[0]["sources"] == ninja.calls[1]["sources"] == ninja.calls[2]["sources"]
    assert str(tmp_path / "venv") not in ninja.calls[0]["sources"][0]


def test_a_staged_source_is_kept_unless_it_differs(tmp_path):
    src, folder = _install(tmp_path / "a"), tmp_path / "build"
    folder.mkdir()
    staged = kernels._stage(src, folder)
    assert staged == folder / "gemv.cpp" and staged.read_bytes() == src.read_bytes()
    old = time.time() - 3600
    os.utime(staged, (old, old))
    assert kernels._stage(src, folder) == staged and staged.stat().st_mtime == pytest.approx(
        old
    )  # not rewritten
    staged.write_text("half a file")  # damaged: written again
    assert kernels._stage(src, folder).read_bytes() == src.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["gemv.cpp"]
