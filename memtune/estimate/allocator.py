"""A model of PyTorch's CUDA caching allocator, replayed over the trace's allocations.

It reproduces what ``max_memory_allocated`` and ``max_memory_reserved`` count, following
``c10/cuda/CUDACachingAllocator.cpp`` with its default settings (no ``expandable_segments``, no
``max_split_size_mb``, no ``roundup_power2_divisions``):

* requests are rounded up to 512 bytes (``round_size``);
* up to 1 MiB they come from the small pool, in 2 MiB segments; larger ones from the large pool, in 20 MiB segments
  below 10 MiB and in segments rounded up to 2 MiB above (``get_allocation_size``);
* a request takes the smallest free block of its pool and stream that fits (best fit); the block is split when
  the rest is at least 512 bytes (small pool) or more than 1 MiB (large pool), otherwise the whole block is handed
  out and counted as allocated (``should_split``);
* freed blocks merge with free neighbours of the same segment; segments are never returned to the driver while the
  step runs, so reserved memory only grows;
* with a ``capacity`` (the memory a smaller card leaves to PyTorch), a segment that does not fit makes the allocator
  release every cached segment that is entirely free and try again (``release_cached_blocks``, counted in
  ``num_alloc_retries``); if it still does not fit, the step runs out of memory.

With ``expandable_segments:True`` (``PYTORCH_CUDA_ALLOC_CONF``) each pool of each stream is one segment of virtual
address space that grows by mapping pages at its end (``ExpandableSegment``: 2 MiB pages for the small pool, 20 MiB
for the large): when no free block fits, only the shortfall beyond a free block at the end is mapped, so memory
freed earlier in the segment is reused instead of stranding a whole new segment. Under pressure the pages that lie
entirely inside free blocks are unmapped, and mapped again when a block that spans them is handed out.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from memtune.units import MiB

BLOCK = 512
SMALL_SIZE = 1 * MiB
SMALL_BUFFER = 2 * MiB
LARGE_BUFFER = 20 * MiB
MIN_LARGE_ALLOC = 10 * MiB
ROUND_LARGE = 2 * MiB


def round_size(size: int) -> int:
    return BLOCK if size < BLOCK else -(-size // BLOCK) * BLOCK


def allocation_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(slots=True, eq=False)
class Block:
    size: int
    addr: int
    segment: int
    pool: tuple[str, bool]
    allocated: bool = False
    prev: "Block | None" = None
    next: "Block | None" = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment, self.addr)


class AllocatorOutOfMemory(Exception):
    """The request does not fit under the capacity even after releasing the cache."""


class CachingAllocatorModel:
    def __init__(self, capacity: int | None = None, *, expandable: bool = False) -> None:
        self.capacity = capacity
        self.expandable = expandable
        self._tails: dict[tuple[str, bool], Block] = {}
        self._unmapped: dict[int, int] = {}  # id(free block) -> bytes of it not mapped (expandable only)
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.num_alloc_retries = 0
        self._free: dict[tuple[str, bool], list[tuple[tuple[int, int, int], Block]]] = {}
        self._segments = itertools.count()

    def malloc(self, nbytes: int, stream: str = "default") -> Block:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = (stream, small)
        free = self._free.setdefault(pool, [])
        i = bisect.bisect_left(free, (size, -1, -1), key=lambda e: e[0])
        if i < len(free):
            block = free.pop(i)[1]
            if self.expandable:
                self._map(self._unmapped.pop(id(block), 0))
        elif self.expandable:
            block = self._grow(pool, size)
        else:
            seg_size = allocation_size(size)
            if self.capacity is not None and self.reserved + seg_size > self.capacity:
                self.num_alloc_retries += 1
                self._release_cached()
                if self.reserved + seg_size > self.capacity:
                    raise AllocatorOutOfMemory(f"{seg_size} bytes more than the {self.capacity} bytes capacity")
            block = Block(size=seg_size, addr=0, segment=next(self._segments), pool=pool)
            self.reserved += seg_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block.size - size
        if (small and remaining >= BLOCK) or (not small and remaining > SMALL_SIZE):
            rest = Block(size=remaining, addr=block.addr + size, segment=block.segment, pool=pool,
                         prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            if self._tails.get(pool) is block:
                self._tails[pool] = rest
            self._insert(rest)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        block.allocated = False
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove(neighbour)
                if self.expandable:
                    unmapped = self._unmapped.pop(id(neighbour), 0)
                    if unmapped:
                        self._unmapped[id(block)] = self._unmapped.get(id(block), 0) + unmapped
                    if self._tails.get(block.pool) is neighbour:
                        self._tails[block.pool] = block
                if neighbour is block.prev:
                    block.addr, block.prev = neighbour.addr, neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                block.size += neighbour.size
        self._insert(block)

    def _map(self, nbytes: int) -> None:
        if nbytes and self.capacity is not None and self.reserved + nbytes > self.capacity:
            self.num_alloc_retries += 1
            self._release_cached()
            if self.reserved + nbytes > self.capacity:
                raise AllocatorOutOfMemory(f"{nbytes} bytes more than the {self.capacity} bytes capacity")
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _grow(self, pool: tuple[str, bool], size: int) -> Block:
        """Map pages at the end of the pool's expandable segment until its last block holds ``size`` bytes."""
        page = SMALL_BUFFER if pool[1] else LARGE_BUFFER
        tail = self._tails.get(pool)
        spare = tail.size if tail is not None and not tail.allocated else 0
        grow = -(-(size - spare) // page) * page
        if spare:
            self._remove(tail)
            self._map(self._unmapped.pop(id(tail), 0))
        self._map(grow)
        if spare:
            tail.size += grow
            return tail
        end = tail.addr + tail.size if tail is not None else 0
        block = Block(size=grow, addr=end, segment=0, pool=pool, prev=tail)
        if tail is not None:
            tail.next = block
        self._tails[pool] = block
        return block

    def _release_cached(self) -> None:
        if self.expandable:
            # Unmap every page that lies entirely inside a free block.
            for free in self._free.values():
                for _, block in free:
                    page = SMALL_BUFFER if block.pool[1] else LARGE_BUFFER
                    start, end = -(-block.addr // page) * page, (block.addr + block.size) // page * page
                    whole = max(0, end - start) - self._unmapped.get(id(block), 0)
                    if whole > 0:
                        self._unmapped[id(block)] = self._unmapped.get(id(block), 0) + whole
                        self.reserved -= whole
            return
        for pool, free in self._free.items():
            whole = [e for e in free if e[1].prev is None and e[1].next is None]
            for entry in whole:
                self.reserved -= entry[1].size
            self._free[pool] = [e for e in free if not (e[1].prev is None and e[1].next is None)]

    def _insert(self, block: Block) -> None:
        bisect.insort(self._free.setdefault(block.pool, []), (block.key(), block), key=lambda e: e[0])

    def _remove(self, block: Block) -> None:
        free = self._free[block.pool]
        i = bisect.bisect_left(free, block.key(), key=lambda e: e[0])
        assert free[i][1] is block, "free list out of order"
        free.pop(i)


@dataclass(frozen=True, slots=True)
class Replay:
    fits: bool
    peak_allocated: int
    peak_reserved: int
    num_alloc_retries: int


def replay(events: list[tuple[int, int, int, str]], capacity: int | None = None, *,
           expandable: bool = False) -> Replay:
    """Run a recorded sequence of ``(op, id, bytes, stream)`` events (op 1 = malloc, 0 = free) through the model."""
    model = CachingAllocatorModel(capacity, expandable=expandable)
    blocks: dict[int, Block] = {}
    try:
        for op, uid, nbytes, stream in events:
            if op:
                blocks[uid] = model.malloc(nbytes, stream)
            else:
                model.free(blocks.pop(uid))
    except AllocatorOutOfMemory:
        return Replay(False, model.peak_allocated, model.peak_reserved, model.num_alloc_retries)
    return Replay(True, model.peak_allocated, model.peak_reserved, model.num_alloc_retries)
