"""Thread workspaces: per-thread inflaters and the accumulator planes, pooled per grid shape and reused
from volume to volume, and the process-wide thread pool.

The pool state (`_POOL`, `_EXECUTORS`, `_POOL_LOCK`) lives here; patch it here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.constants import CHANNELS
from pipeline.io import Inflater, SparseInflater

N_BYTES = (len(CHANNELS) + 7) // 8  # bytes of the channel word in use


class _Workspace:
    """A gzip inflater (one per thread) and, for the workspace that accumulates a volume, its uint8
    planes (one per byte of the channel word; allocated on first use).

    Workspaces are pooled per grid shape and reused from volume to volume: a shard of same-size
    volumes allocates (and page-faults) them once. After a volume only the touched rows are zeroed.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self._planes: np.ndarray | None = None
        self.inflater = Inflater()
        self.sparse = SparseInflater()
        self.start()

    @property
    def planes(self) -> np.ndarray:
        if self._planes is None:
            self._planes = np.zeros((N_BYTES, *self.shape), np.uint8)
        return self._planes

    def start(self) -> None:
        self.touched = np.zeros(N_BYTES, bool)
        self.whole = False  # a label map OR-ed whole planes
        self.boxes: dict[int, list[int]] = {}  # channel bit -> [z0, z1, y0, y1, x0, x1]

    def grow(self, word: int, box: list[int]) -> None:
        _grow(self.boxes, word, box)

    def clear(self) -> None:
        if self._planes is not None:
            if self.whole:
                self._planes.fill(0)
            else:  # whole rows (contiguous) of each plane's union box
                per_plane: dict[int, list[int]] = {}
                for bit, box in self.boxes.items():
                    _grow(per_plane, 1 << (bit // 8), box)
                for k, (z0, z1, y0, y1, _, _) in per_plane.items():
                    self._planes[k, z0:z1, y0:y1] = 0
        self.start()


def _grow(boxes: dict[int, list[int]], word: int, box: list[int]) -> None:
    bit = 0
    while word >> bit:
        if word >> bit & 1:
            old = boxes.get(bit)
            boxes[bit] = list(box) if old is None else [min(old[0], box[0]), max(old[1], box[1]),
                                                         min(old[2], box[2]), max(old[3], box[3]),
                                                         min(old[4], box[4]), max(old[5], box[5])]
        bit += 1


_POOL: dict[tuple[int, int, int], list[_Workspace]] = {}
_POOL_LOCK = threading.Lock()


def _take_workspace(shape: tuple[int, int, int], planes: bool = False) -> _Workspace:
    """A pooled workspace for this grid shape (with `planes`: preferably one whose planes exist)."""
    with _POOL_LOCK:
        for other in [s for s in _POOL if s != shape]:  # another grid size: free the old ones
            del _POOL[other]
        free = _POOL.setdefault(shape, [])
        if free:
            have = [i for i, ws in enumerate(free) if ws._planes is not None] if planes else []
            return free.pop(have[-1] if have else -1)
    return _Workspace(shape)


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}  # worker count -> the process-wide pool


def _executor(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of `threads` worker threads, kept from volume to volume (threads start once)."""
    with _POOL_LOCK:
        pool = _EXECUTORS.get(threads)
        if pool is None:
            for other in list(_EXECUTORS):  # a job uses one thread count: drop the others
                _EXECUTORS.pop(other).shutdown(wait=False)
            pool = _EXECUTORS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="regions")
        return pool


def _give_back(shape: tuple[int, int, int], workspaces: Sequence[_Workspace]) -> None:
    with _POOL_LOCK:
        free = _POOL.setdefault(shape, [])
        for ws in workspaces:
            if len(free) < 8:
                free.append(ws)
