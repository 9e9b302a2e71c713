"""MemoryGuard against real psutil readings of real allocations."""

import re
import time

import pytest
import torch

from odl_fed.training.data import load_dataset
from odl_fed.training.memory_guard import MemoryBudgetExceeded, MemoryGuard
from odl_fed.training.task import train_epoch

MiB = 2**20


def test_reading_tracks_what_the_client_allocates():
    with MemoryGuard(2048 * MiB, client="rpi4-0") as guard:
        block = torch.ones(300 * MiB // 4)  # 300 MiB, touched
        guard.check()
        del block
    assert 280 * MiB <= guard.peak <= 420 * MiB
    assert guard.samples >= 2 and not guard.breached


def test_breach_raises_a_clear_failure_naming_client_budget_and_peak():
    with MemoryGuard(100 * MiB, client="tiny-3") as guard:
        block = torch.ones(250 * MiB // 4)
        with pytest.raises(MemoryBudgetExceeded, match=re.escape("client tiny-3: training memory ")) as info:
            guard.check()
        del block
    assert "exceeded its budget of 100.0 MiB" in str(info.value)
    assert info.value.peak >= 230 * MiB and info.value.budget == 100 * MiB


def _thread_samples(guard: MemoryGuard, count: int, timeout: float = 10.0) -> None:
    """Wait until the guard's own thread has taken ``count`` more readings (nothing else samples here)."""
    target, deadline = guard.samples + count, time.monotonic() + timeout
    while guard.samples < target:
        assert time.monotonic() < deadline, f"the sampling thread took {guard.samples} readings in {timeout} s"
        time.sleep(0.001)


def test_the_sampling_thread_sees_a_transient_peak_between_checks():
    with MemoryGuard(50 * MiB, client="phone-1", interval=0.001) as guard:
        _thread_samples(guard, 2)
        assert guard.peak < 50 * MiB and not guard.breached  # nothing allocated yet
        for _ in range(3):
            block = torch.ones(200 * MiB // 4)
            _thread_samples(guard, 2)  # no check() here: only the thread can see this peak
            del block
        during = guard.peak
    assert during >= 150 * MiB and guard.breached


def test_training_stops_at_the_first_check_past_the_budget():
    data = load_dataset("digits", split="train")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    hog = []
    original_step = optimizer.step

    def step_and_hog(*args, **kwargs):
        hog.append(torch.ones(64 * MiB // 4))  # a leak of 64 MiB per step
        return original_step(*args, **kwargs)

    optimizer.step = step_and_hog
    with MemoryGuard(200 * MiB, client="rpi4-7") as guard:
        with pytest.raises(MemoryBudgetExceeded, match="client rpi4-7"):
            train_epoch(model, data, optimizer=optimizer, batch_size=32, image_size=64, guard=guard)
    assert 3 <= len(hog) <= 5  # stopped within a step of the breach, not at the end of the epoch


def test_a_second_client_in_the_same_process_is_not_hidden_by_reused_pages():
    """In simulation clients run one after another in one actor process: each must see its own allocations."""
    readings = []
    for client in ("rpi4-0", "rpi4-1", "phone-2"):
        with MemoryGuard(2048 * MiB, client=client) as guard:
            blocks = [torch.ones(2 * MiB // 4) for _ in range(60)]  # 120 MiB in 2 MiB pieces
            guard.check()
            del blocks
        readings.append(guard.peak)
    assert all(100 * MiB <= peak <= 200 * MiB for peak in readings), [r / MiB for r in readings]


@pytest.mark.process  # a fresh python, for a C library in its first state
def test_the_server_gives_large_blocks_back_when_they_are_freed():
    """After glibc has raised its threshold, 200 MiB of freed 4 MiB blocks between survivors stay
    resident; within mmap_threshold(LARGE_BLOCK) they go back to the system (psutil, a fresh process)."""
    import subprocess
    import sys

    code = """
import psutil
from odl_fed.training.allocator import LARGE_BLOCK, mmap_threshold, own_process
P, keep = psutil.Process(), []
def cycle():
    big = []
    for _ in range(50):
        big.append(bytearray(4 * 2**20)); keep.append(bytearray(4096))  # a survivor after each block
    del big
    return P.memory_info().rss
x = bytearray(8 * 2**20); del x  # glibc raises its threshold past 4 MiB here
base = P.memory_info().rss; kept = cycle() - base
with mmap_threshold(LARGE_BLOCK) as unowned:
    pass
own_process()
with mmap_threshold(LARGE_BLOCK) as done:
    base = P.memory_info().rss; returned = cycle() - base
print(done, unowned, kept, returned)
"""
    done, unowned, kept, returned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout.split()
    if done != "True":
        pytest.skip("this C library has no mallopt (not glibc): the server keeps its default")
    assert unowned == "False", "a process that has not claimed its allocator had its mmap threshold changed"
    assert int(kept) > 150 * 2**20 and int(returned) < 20 * 2**20


def test_in_a_forked_child_the_guard_reads_the_childs_own_allocation_not_the_parents_pages():
    """The warm launcher (odl_fed.deploy.launcher) forks a ClientApp per message from a process that holds
    torch, the model and the data: the child's RSS starts with all of the parent's resident pages, and the
    guard's baseline, read in the child when training starts, leaves them out."""
    import json
    import os

    held = torch.ones(300 * MiB // 4)  # the parent's pages (a launcher's model and data), touched
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no torch work (its OpenMP pool is the parent's), plain Python allocations
        code = 1
        try:
            with MemoryGuard(1024 * MiB, client="forked-0") as guard:
                own = bytearray(b"\x01") * (100 * MiB)  # 100 MiB, written
                guard.check()
                del own
            os.write(write, json.dumps({"peak": guard.peak, "baseline": guard.baseline}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish in 60 s")
        time.sleep(0.05)
    reading = json.loads(os.read(read, 4096))
    os.close(read)
    assert reading["baseline"] >= 300 * MiB  # the child's RSS does hold the parent's pages...
    assert 90 * MiB <= reading["peak"] <= 160 * MiB  # ...and its guard counts only its own 100 MiB
    del held
