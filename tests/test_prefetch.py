"""The storage tier's reader (``hetegen_fx.prefetch``): items read ahead into a bounded ring equal the
checkpoint's rows, every pass reads them again (real reads, counted), the ring never runs more than its
slots ahead of the consumer, an item asked out of turn restarts the reader, and a failed read is raised in
the consumer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hetegen_fx import prefetch
from hetegen_fx.checkpoint import Checkpoint, CheckpointError
from hetegen_fx.prefetch import Item, StorageReader


@pytest.fixture()
def ckpt(tmp_path):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": torch.randn(64 + 8 * i, 32, generator=gen) for i in range(7)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    c = Checkpoint.open(tmp_path)
    yield c, tensors
    c.close()


class _Event:  # stands for a CUDA event on the copy stream
    def __init__(self) -> None:
        self.done = threading.Event()

    def synchronize(self) -> None:
        self.done.wait()


def _items(tensors, rows=(8, 40)):
    return [Item(n, rows, (rows[1] - rows[0], t.shape[1]), t.dtype) for n, t in tensors.items()]


@pytest.mark.parametrize("threads", [1, 3])
def test_every_pass_reads_the_checkpoints_rows_into_fixed_views(ckpt, threads, monkeypatch):
    monkeypatch.setattr(prefetch, "CHUNK_BYTES", 1024)  # several pieces per item: the pool's threads share it
    c, tensors = ckpt
    items = _items(tensors)
    r = StorageReader(c, items, slots=3, threads=threads)
    try:
        views = [r.view(i) for i in range(len(items))]
        for _ in range(3):
            for i, (name, t) in enumerate(tensors.items()):
                got = r.wait(i)
                assert got is views[i] and got.data_ptr() == r.view(i).data_ptr()
                assert torch.equal(got, t[8:40]), name
                got.zero_()  # a stale slot would show here in the next pass
                r.release(i)
        s = r.stats()
        assert s.reads >= 3 * len(items) and s.bytes >= 3 * sum(it.nbytes for it in items)
        assert s.passes == 3 and s.restarts == 0
    finally:
        r.close()


def test_the_reader_runs_at_most_its_slots_ahead_of_the_consumer(ckpt):
    c, tensors = ckpt
    r = StorageReader(c, _items(tensors), slots=2, threads=1)
    try:
        r.wait(0)  # item 0 held: item 2 (slot 0) cannot be read
        deadline = time.time() + 5
        while r.stats().reads < 2 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert r.stats().reads == 2  # items 0 and 1, no more
        r.release(0)
        r.wait(1)
        r.release(1)
        deadline = time.time() + 5
        while r.stats().reads < 4 and time.time() < deadline:
            time.sleep(0.01)
        assert r.stats().reads == 4
    finally:
        r.close()


def test_a_slot_is_read_into_only_after_its_release_event_completed(ckpt):
    c, tensors = ckpt
    r = StorageReader(c, _items(tensors), slots=2, threads=1)
    try:
        r.wait(0)
        e = _Event()
        r.release(0, e)
        time.sleep(0.2)
        assert r.stats().reads == 2  # waiting on the event: item 2 not read yet
        e.done.set()
        r.wait(1)
        r.release(1)
        assert torch.equal(r.wait(2), list(tensors.values())[2][8:40])
    finally:
        r.close()


def test_rows_shared_between_the_cpu_and_the_device_are_fixed_views_of_a_held_slot(ckpt):
    """A Linear whose CPU part computes ring rows: ``wait(i, rows)`` gives the first rows, ``held`` the rest
    while the slot is held, each the same tensor at every pass (the CPU worker knows weights by their tensor);
    the slot waits for every event of the release (the copy's and the CPU job's); a new reader can lay its
    ring in the old one's bytes."""
    c, tensors = ckpt
    items = _items(tensors)
    r = StorageReader(c, items, slots=2, threads=1)
    try:
        first = r.wait(0, 10)
        rest = r.held(0, 10, 32)
        whole = list(tensors.values())[0][8:40]
        assert torch.equal(first, whole[:10]) and torch.equal(rest, whole[10:])
        assert r.held(0, 10, 32) is rest and r.view(0, 0, 10) is first
        copy, job = _Event(), _Event()
        r.release(0, (copy, job))
        with pytest.raises(RuntimeError, match="not held"):
            r.held(0, 0, 5)
        with pytest.raises(IndexError):
            r.view(1, 0, 33)
        r.wait(1)
        copy.done.set()
        time.sleep(0.2)
        assert r.stats().reads == 2  # item 2 waits for the job's event too
        job.done.set()
        r.release(1)
        for i in range(2, len(items)):
            r.wait(i)
            r.release(i)
        assert r.wait(0, 10) is first  # the next pass: the same tensors
        r.release(0)
    finally:
        r.close()
    again = StorageReader(c, items, slots=2, threads=1, buffer=r.buffer)
    try:
        assert again.buffer is r.buffer
        assert torch.equal(again.wait(0), list(tensors.values())[0][8:40])
    finally:
        again.close()
    small = StorageReader(c, items, slots=2, threads=1, buffer=torch.empty(16, dtype=torch.uint8))
    small.close()
    assert small.buffer.numel() == small.ring_bytes  # too small a buffer is not used


def test_a_slot_still_held_by_another_part_is_a_clear_error_not_a_hang(ckpt):
    """A step that holds more parts at once than the ring has slots would wait forever for a slot it holds
    itself: the reader says so instead."""
    c, tensors = ckpt
    r = StorageReader(c, _items(tensors), slots=2, threads=1)
    try:
        r.wait(0)
        r.wait(1)
        with pytest.raises(RuntimeError, match="Raise storage_slots"):
            r.wait(2)
    finally:
        r.close()


def test_a_restart_keeps_the_parts_the_consumer_holds(ckpt):
    """Out of turn while a part is held (a CPU job will read it): what was read ahead is dropped, the held
    part is not read into until it is released; a Linear used twice is two items of one key."""
    c, tensors = ckpt
    whole = [t[8:40] for t in tensors.values()]
    r = StorageReader(c, _items(tensors), slots=3, threads=1)
    r.keys = {"a": [0], "b": [2, 5]}
    try:
        assert r.index("b", taking=True) == 2 and r.index("a", taking=True) == 0  # 0 is next in the cycle
        first = r.wait(0, 10)
        rest = r.held(0, 10, 32)
        r.wait(2)  # out of turn: a restart
        assert r.stats().restarts == 1
        time.sleep(0.2)
        assert torch.equal(first, whole[0][:10]) and torch.equal(rest, whole[0][10:])  # not read into
        assert r.index("b", taking=False) == 2
        r.release(2)
        assert r.index("b", taking=True) == 2 and r.index("x", taking=True) is None  # 3 is next: not b's
        r.release(0)
        assert torch.equal(r.wait(3), whole[3])  # into slot 0 once part 0 was released
        r.release(3)
        r.wait(4)
        r.release(4)
        assert r.index("b", taking=True) == 5
        assert torch.equal(r.wait(5), whole[5])
        assert r.index("b", taking=False) == 5  # the one taken last
    finally:
        r.close()


def test_an_item_out_of_turn_restarts_the_reader_from_it(ckpt):
    c, tensors = ckpt
    names = list(tensors)
    r = StorageReader(c, _items(tensors), slots=3, threads=1)
    try:
        for i in range(3):  # a forward that broke off after three items (never released)
            r.wait(i)
        assert r.settle() == 3  # the launcher gives them back before the next call
        for i in range(len(names)):  # the next forward starts again at item 0
            assert torch.equal(r.wait(i), tensors[names[i]][8:40])
            r.release(i)
        assert r.stats().restarts == 1
        assert torch.equal(r.wait(0), tensors[names[0]][8:40])  # and the cycle goes on
    finally:
        r.close()


def test_a_failed_read_is_raised_by_the_consumer(ckpt, monkeypatch):
    c, tensors = ckpt
    r = StorageReader(c, _items(tensors), slots=2, threads=1)

    def broken(*a, **k):
        raise CheckpointError("model.safetensors ended at byte 9 while reading: the file was truncated")

    monkeypatch.setattr(c, "read", broken)
    try:
        with pytest.raises(CheckpointError, match="truncated"):
            r.wait(0)
    finally:
        r.close()


def test_bad_reader_arguments_are_clear_errors(ckpt):
    from hetegen_fx.errors import ConfigError

    c, tensors = ckpt
    with pytest.raises(ConfigError, match="at least one item"):
        StorageReader(c, [])
    with pytest.raises(ConfigError, match="slots and threads"):
        StorageReader(c, _items(tensors), slots=0)


def test_a_pass_read_at_less_than_half_the_planned_rate_is_warned_about_once(ckpt, monkeypatch):
    c, tensors = ckpt
    monkeypatch.setattr(prefetch.StorageReader, "_read", lambda self, item, out: time.sleep(0.01))
    items = [Item("w0", (0, 64), (64, 32), torch.float32)] * 2
    r = StorageReader(c, items, slots=2, threads=1, expected_rate=1e15)
    monkeypatch.setattr(Item, "nbytes", property(lambda self: 64 << 20))  # as if each read were 64 MiB
    try:
        with pytest.warns(RuntimeWarning, match=r"reads at \d+ MiB/s, less than half"):
            for _ in range(3):
                for i in range(2):
                    r.wait(i)
                    r.release(i)
            r.close()
    finally:
        r.close()


def test_a_restart_keeps_the_release_event_of_a_slot_a_copy_may_still_read(ckpt):
    c, tensors = ckpt
    r = StorageReader(c, _items(tensors), slots=2, threads=1)
    try:
        r.wait(0)
        e = _Event()
        r.release(0, e)  # the copy out of slot 0 has not landed yet
        r.wait(3)  # out of turn: a restart (item 3 lives in slot 1)
        r.release(3)
        time.sleep(0.2)
        # item 4 lives in slot 0: not read while the copy from it may still run
        assert r._slot[0].occupant != (r.stats().passes, 4) or not r._slot[0].filled
        e.done.set()
        assert torch.equal(r.wait(4), list(tensors.values())[4][8:40])
    finally:
        r.close()


def test_a_forward_that_broke_off_holding_a_slot_does_not_stall_the_next_pass(ckpt):
    c, tensors = ckpt
    names = list(tensors)
    stale = []

    def make():
        stale.append(_Event())
        stale[-1].done.set()
        return stale[-1]

    r = StorageReader(c, _items(tensors), slots=2, threads=1, stale_event=make)
    done = threading.Event()

    def run():
        for i in range(len(names)):
            r.wait(i)
            if i != len(names) - 1:  # the last item is never released: the forward broke off after it
                r.release(i)
        assert r.settle() == 1  # before the next call (the launcher)
        for i in range(len(names)):  # the next forward, in turn from item 0
            assert torch.equal(r.wait(i), tensors[names[i]][8:40])
            r.release(i)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=10)
    try:
        assert done.is_set(), "the second pass stalled on the slot the first never released"
        assert stale  # that slot waited for the copy stream before it was read into again
    finally:
        r.close()
