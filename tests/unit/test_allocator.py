"""The caching-allocator model against the rules of c10/cuda/CUDACachingAllocator.cpp."""

from memtune.estimate.allocator import CachingAllocatorModel, allocation_size, round_size

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
