"""Fuzz the sparse inflater: garbage, and valid gzip streams of mask-like or random data that are then
bit-flipped, overwritten, cut or made longer than the buffer, on random buffer layouts. Each input
must end in a status code, and clear() must leave the buffer all zero.

    python tests/sparse_gunzip_fuzz.py MODULE_SO SEED N     (tests/test_sparse_gunzip.py runs it, also
                                                             on a build with AddressSanitizer)
"""

from __future__ import annotations

import importlib.util
import random
import sys
import zlib

import numpy as np


def fuzz(sg, seed: int, n: int) -> dict[int, int]:
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    statuses: dict[int, int] = {}
    for _ in range(n):
        nz, ny, nx = rng.randint(1, 6), rng.randint(1, 20), rng.randint(1, 400)
        vox = rng.choice([0, 1, 352, 1000])
        size = vox + nz * ny * nx
        if rng.random() < 0.2:  # garbage, half of it behind a gzip magic
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            if rng.random() < 0.5:
                data = b"\x1f\x8b\x08" + bytes([rng.randrange(32)]) + data
        else:
            raw = (nprng.random(size) < rng.choice([0.0, 0.01, 0.3, 1.0])).astype(np.uint8)
            if rng.random() < 0.3:
                raw = nprng.integers(0, 256, size, dtype=np.uint8)
            raw_bytes = raw.tobytes()
            if rng.random() < 0.2:
                raw_bytes += b"\x01" * rng.randint(1, 50)  # longer than the buffer
            c = zlib.compressobj(rng.choice([0, 1, 6, 9]), zlib.DEFLATED, 31, 9, rng.choice([0, 1, 2, 3, 4]))
            buf = bytearray(c.compress(raw_bytes) + c.flush())
            for _ in range(rng.choice([0, 1, 1, 2, 5, 20])):
                k = rng.randrange(len(buf))
                op = rng.random()
                if op < 0.6:
                    buf[k] ^= 1 << rng.randrange(8)
                elif op < 0.8:
                    buf[k] = rng.randrange(256)
                else:
                    del buf[k : k + rng.randint(1, 40)]
                if not buf:
                    break
            if rng.random() < 0.2:
                buf = buf[: rng.randrange(len(buf) + 1)]
            data = bytes(buf)
        out = np.zeros(size, np.uint8)
        dirty = np.zeros(nz * ny, np.uint8)
        status, _, head_end, _, _ = sg.gunzip(data, out, vox, nx, ny, dirty)
        sg.clear(out, vox, nx, ny, dirty, head_end)
        if out.any() or dirty.any():
            raise AssertionError(f"seed {seed}: clear() left non-zero bytes")
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


def main() -> None:
    spec = importlib.util.spec_from_file_location("_sparse_gunzip", sys.argv[1])
    sg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sg)
    print(sorted(fuzz(sg, int(sys.argv[2]), int(sys.argv[3])).items()))


if __name__ == "__main__":
    main()
