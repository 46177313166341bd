"""Coverage-guided fuzzing of the sparse inflater (pipeline/_sparse_gunzip.c) against zlib, with atheris.

libFuzzer (inside atheris) mutates the input and keeps every input that reaches new edges of the C code
(the extension is built with `-fsanitize=fuzzer-no-link`, so its branches are instrumented) or of this
harness. Built with AddressSanitizer and UBSan too, any read or write outside the buffers or undefined
behaviour aborts the run with the input that caused it.

An input is `[mode][layout bytes][body]`:
- mode 0 (most inputs): `body` is a raw deflate stream. zlib inflates it; when zlib accepts it, the
  harness wraps it in a gzip member with the right CRC-32 and length, so mutations explore the deflate
  format (block types, Huffman tables, matches, zero runs) instead of dying on the gzip trailer;
- mode 1: the same, with the CRC or the length made wrong (must end in status 4, or an earlier error);
- mode 2: `body` is used as the whole file, as it is (headers, flags, members, padding, garbage).
The output buffer is `vox + nz * ny * nx` bytes with the layout taken from the input; usually just large
enough for zlib's output, sometimes smaller (status 3 expected).

The oracle, for every input: the call returns one of the six status codes; when zlib decodes the file
completely (every member, CRC and length right, zero padding only after the last) and the output fits,
the sparse inflater says ok and wrote exactly zlib's bytes, with the right extent (the OR of the voxels
and the bounding box exact; the header end and the dirty rows covering every non-zero byte); when zlib
refuses it, the sparse inflater does not say ok. And clear() leaves the buffer all zero.

    LD_PRELOAD=<atheris>/asan_with_fuzzer.so python tests/sparse_gunzip_atheris.py MODULE_SO [libFuzzer args]

`tests/test_sparse_gunzip_atheris.py` builds the module and runs this briefly; `benchmarks/
fuzz_sparse_gunzip.py` runs it longer and prints the executions and the coverage reached.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import zlib

import numpy as np

SG = None  # the extension under test, loaded from the path given on the command line
OUT_CAP = 1 << 16  # output bytes at most per input (keeps an execution fast)
# libFuzzer's RSS limit reads the peak RSS, which Linux carries over from the parent across fork and exec: a
# harness started from a large process (a pytest session holding models) would be "out of memory" before
# its first input. So no RSS limit, and a per-allocation limit instead (no input here needs 256 MB).
MEMORY_LIMITS = ("-rss_limit_mb=0", "-malloc_limit_mb=256")


def build(out_so: str) -> list[str]:
    """Compile the extension for fuzzing: libFuzzer edge coverage, AddressSanitizer, UBSan (any UB aborts).

    Returns the environment additions a run needs: atheris's ASan + libFuzzer runtime preloaded into the
    (uninstrumented) Python. Needs clang and its sanitizer runtimes (Debian: clang, libclang-rt-dev).
    """
    import os
    import shutil
    import subprocess
    import sysconfig

    import atheris

    clang = shutil.which("clang")
    if clang is None:
        raise FileNotFoundError("clang not found (Debian: apt-get install clang libclang-rt-14-dev)")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pipeline", "_sparse_gunzip.c")
    subprocess.run([clang, "-O1", "-g", "-fsanitize=address,undefined,fuzzer-no-link",
                    "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-shared", "-fPIC",
                    f"-I{sysconfig.get_paths()['include']}", src, "-o", out_so], check=True)
    runtime = os.path.join(os.path.dirname(os.path.dirname(atheris.__file__)), "asan_with_fuzzer.so")
    return [f"LD_PRELOAD={runtime}", "ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1"]


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("_sparse_gunzip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gzip_member(deflate: bytes, crc: int, size: int) -> bytes:
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + deflate + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


def zlib_gunzip(data: bytes, limit: int) -> bytes | None:
    """Every gzip member inflated by zlib, zero padding allowed after the last; None if zlib refuses."""
    out = bytearray()
    rest = data
    first = True
    while rest:
        if not first and not rest.strip(b"\x00"):
            break
        first = False
        d = zlib.decompressobj(31)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
            if d.unconsumed_tail:
                return out  # more than `limit` bytes: the caller skips the input
            out += d.flush()
        except zlib.error:
            return None
        if not d.eof:
            return None
        rest = d.unused_data
    return bytes(out)


def expected_extent(out: np.ndarray, vox: int, ny: int, nx: int) -> tuple[int, int, np.ndarray, tuple[int, ...]]:
    head = np.flatnonzero(out[:vox])
    head_end = int(head[-1]) + 1 if head.size else 0
    v = out[vox:].reshape(-1, ny, nx)
    value_or = int(np.bitwise_or.reduce(v.ravel())) if v.size else 0
    rows = v.reshape(-1, nx).any(axis=1)
    nz = np.nonzero(v)
    box = tuple(int(f(i)) for i in nz for f in (np.min, lambda i: np.max(i) + 1)) if nz[0].size else (0,) * 6
    return head_end, value_or, rows, box


def check_one(data: bytes) -> None:
    if len(data) < 5:
        return
    mode = data[0] % 3
    nx, ny = 1 + data[1] % 64, 1 + data[2] % 8
    vox = (0, 4, 352, 7)[data[3] % 4]
    short = data[4] % 16 == 0  # one input in 16: a buffer smaller than the output
    body = data[5:]

    if mode == 2:
        file = body
    else:
        try:
            d = zlib.decompressobj(-15)
            raw = d.decompress(body, OUT_CAP + 1)
            complete = d.eof and not d.unconsumed_tail
        except zlib.error:
            raw, complete = b"", False
        crc, size = zlib.crc32(raw), len(raw)
        if mode == 1 or not complete:
            bump = 1 + data[4] % 255
            crc, size = (crc ^ bump, size) if data[4] & 1 else (crc, size + bump)
        stream = body[: len(body) - len(d.unused_data)] if complete else body
        file = gzip_member(stream, crc, size)

    reference = zlib_gunzip(file, OUT_CAP)
    if reference is not None and len(reference) > OUT_CAP:
        return  # larger than this harness checks
    n = len(reference) if reference is not None else data[4] * 37
    rows = -(-max(n - vox, 0) // nx)
    nz = max(1, -(-rows // ny))
    cap = vox + nz * ny * nx
    if short and reference is not None and n > vox + nx * ny:
        nz = max(1, (n - vox) // (nx * ny) - 1)
        cap = vox + nz * ny * nx
    if cap > 4 * OUT_CAP:
        return
    out = np.zeros(cap, np.uint8)
    dirty = np.zeros(nz * ny, np.uint8)
    status, produced, head_end, value_or, box = SG.gunzip(file, out, vox, nx, ny, dirty)
    if status not in (0, 1, 2, 3, 4, 5):
        raise AssertionError(f"unknown status {status}")

    fits = reference is not None and len(reference) <= cap
    if fits and status != 0:
        raise AssertionError(f"zlib inflates this file ({len(reference)} bytes, buffer {cap}) but the sparse "
                             f"inflater says status {status}")
    if reference is None and status == 0:
        raise AssertionError("zlib refuses this file but the sparse inflater says ok")
    if reference is not None and len(reference) > cap and status != 3:
        raise AssertionError(f"output {len(reference)} bytes > buffer {cap} but status {status}, not 3")
    if status == 0:
        if produced != len(reference) or out[:produced].tobytes() != reference or out[produced:].any():
            raise AssertionError("ok, but the bytes differ from zlib's")
        want_head, want_or, want_rows, want_box = expected_extent(out, vox, ny, nx)
        # head_end and the dirty rows bound where bytes were written (a match may copy zeros into a row):
        # they must cover every non-zero byte; the OR and the box are exact
        if (value_or, box) != (want_or, want_box) or not want_head <= head_end <= vox:
            raise AssertionError(f"extent differs: {(head_end, value_or, box)} vs {(want_head, want_or, want_box)}")
        if (want_rows & ~dirty.astype(bool)).any():
            raise AssertionError("a row with non-zero bytes is not flagged dirty")
    SG.clear(out, vox, nx, ny, dirty, head_end)
    if out.any() or dirty.any():
        raise AssertionError("clear() left non-zero bytes")


def seed_corpus(folder: str, n: int = 24) -> None:
    """Mode-0 inputs from real-looking streams: mask-like 0/1 volumes and headers, every deflate strategy."""
    import os

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        nx, ny, vox = 1 + i % 64, 1 + i % 8, (0, 4, 352, 7)[i % 4]
        size = int(rng.integers(1, 8000))
        raw = np.zeros(size, np.uint8)
        lo = int(rng.integers(0, size))
        raw[lo : lo + int(rng.integers(0, 600))] = 1 if i % 3 else rng.integers(0, 256)
        level, strategy = (0, 1, 6, 9)[i % 4], (0, 1, 2, 3, 4)[i % 5]
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 9, strategy)
        body = c.compress(raw.tobytes()) + c.flush()
        layout = bytes([0, nx - 1, ny - 1, (0, 4, 352, 7).index(vox), 1 + i])
        with open(os.path.join(folder, f"seed-{i:02d}"), "wb") as f:
            f.write(layout + body)


def main() -> None:
    import atheris

    global SG
    SG = load_module(sys.argv[1])
    argv = [sys.argv[0]] + sys.argv[2:]
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus:
        seed_corpus(corpus[0])
    atheris.Setup(argv, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
