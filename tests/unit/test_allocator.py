"""The caching-allocator model against the rules of c10/cuda/CUDACachingAllocator.cpp."""

import pytest

from memtune.estimate.allocator import AllocatorOutOfMemory, CachingAllocatorModel, allocation_size, round_size

MiB = 2**20


def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert allocation_size(100) == 2 * MiB  # small pool
    assert allocation_size(3 * MiB) == 20 * MiB  # large pool, below 10 MiB
    assert allocation_size(30 * MiB + 1) == 32 * MiB  # rounded up to 2 MiB


def test_small_requests_share_a_2mib_segment():
    a = CachingAllocatorModel()
    blocks = [a.malloc(1000) for _ in range(4)]
    assert a.allocated == 4 * 1024 and a.reserved == 2 * MiB
    for b in blocks:
        a.free(b)
    assert a.allocated == 0 and a.reserved == 2 * MiB  # segments stay cached


def test_large_block_is_split_only_when_more_than_1mib_remains():
    a = CachingAllocatorModel()
    big = a.malloc(20 * MiB)
    a.free(big)
    b = a.malloc(int(19.5 * MiB))  # 0.5 MiB would remain: not split, the whole block counts as allocated
    assert a.allocated == 20 * MiB
    a.free(b)
    c = a.malloc(15 * MiB)  # 5 MiB remain: split
    assert a.allocated == 15 * MiB and a.reserved == 20 * MiB
    d = a.malloc(5 * MiB)  # reuses the remainder, no new segment
    assert a.reserved == 20 * MiB
    a.free(c)
    a.free(d)
    e = a.malloc(20 * MiB)  # neighbours merged back into one 20 MiB block
    assert a.reserved == 20 * MiB and e.size == 20 * MiB


def test_best_fit_and_streams_are_separate_pools():
    a = CachingAllocatorModel()
    x, y = a.malloc(40 * MiB), a.malloc(60 * MiB)
    a.free(x)
    a.free(y)
    z = a.malloc(39 * MiB)
    assert z.segment == x.segment  # the smallest free block that fits
    a.malloc(50 * MiB, stream="comm")  # another stream cannot take the free 60 MiB block
    assert a.reserved == 40 * MiB + 60 * MiB + 50 * MiB
    assert a.peak_reserved == a.reserved


def test_under_a_capacity_the_cache_is_released_before_running_out():
    from memtune.estimate.allocator import replay

    # 60 MiB allocated and freed, then 80 MiB: without a limit both segments stay reserved (140 MiB)
    events = [(1, 0, 60 * MiB, "default"), (0, 0, 0, ""), (1, 1, 80 * MiB, "default")]
    free = replay(events)
    assert free.fits and free.peak_reserved == 140 * MiB and free.num_alloc_retries == 0
    capped = replay(events, capacity=100 * MiB)  # the free 60 MiB segment is released, then 80 MiB fits
    assert capped.fits and capped.num_alloc_retries == 1 and capped.peak_reserved == 80 * MiB
    assert not replay(events, capacity=70 * MiB).fits


def _fragmenting(model: CachingAllocatorModel) -> None:
    """60 MiB freed, 25 MiB carved out of it, then 50 MiB: the 35 MiB left is too small and cannot be released."""
    model.free(model.malloc(60 * MiB))
    model.malloc(25 * MiB)
    model.malloc(50 * MiB)


def test_expandable_segments_grow_one_segment_in_20mib_pages():
    model = CachingAllocatorModel(expandable=True)
    a = model.malloc(30 * MiB)
    assert model.reserved == 40 * MiB  # two 20 MiB pages
    model.malloc(5 * MiB)  # fits in the mapped rest of the segment: nothing new is mapped
    assert model.reserved == 40 * MiB
    model.free(a)
    model.malloc(25 * MiB)  # reuses the freed range at the start
    assert model.reserved == 40 * MiB and model.allocated == 30 * MiB


def test_expandable_segments_grow_where_fixed_segments_fragment():
    capacity = 100 * MiB
    with pytest.raises(AllocatorOutOfMemory):
        _fragmenting(CachingAllocatorModel(capacity))  # a 60 MiB segment, partly used, and a new 50 MiB one: 110
    model = CachingAllocatorModel(capacity, expandable=True)
    _fragmenting(model)  # the free 35 MiB at the end of the segment grows by one 20 MiB page
    assert model.reserved == 80 * MiB and model.allocated == 75 * MiB


def test_under_pressure_expandable_segments_unmap_whole_free_pages():
    model = CachingAllocatorModel(100 * MiB, expandable=True)
    a = model.malloc(60 * MiB)
    model.malloc(20 * MiB)
    model.free(a)  # pages [0, 60) free, [60, 80) in use: 80 MiB mapped
    model.malloc(30 * MiB, stream="other")  # another stream's segment: 40 MiB more would exceed 100 MiB
    assert model.num_alloc_retries == 1 and model.reserved == 20 * MiB + 40 * MiB
