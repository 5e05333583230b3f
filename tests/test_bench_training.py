"""The training benchmark's CPU memory counter (benchmarks/bench_training.py): it counts exactly the storages
operators allocate inside it, until they are freed; views and in-place results of existing tensors are not
new memory."""

from __future__ import annotations

import torch
from sc_harness.scripts import load_script

MIB = 2**20


def _bench():
    return load_script("benchmarks/bench_training.py", "sc_bench_training")


def test_allocated_bytes_counts_allocations_until_freed():
    existing = torch.zeros(MIB // 4)
    with _bench().AllocatedBytes() as counter:
        a = torch.ones(MIB // 4)  # 1 MiB
        b = a * 2  # 2 MiB live
        a.add_(1)
        existing.mul_(2)  # in place on a tensor from before: not new memory
        view = existing[:10]
        del a  # 1 MiB live
        c = torch.empty(MIB // 2)  # 3 MiB live: the peak
        del c
    assert counter.peak == 3 * MIB and counter.live == MIB  # b is still alive
    del b, view
