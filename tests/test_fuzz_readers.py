"""Property-based fuzzing of the CT / mask reading path (hypothesis).

Small valid .nii and .nii.gz files (an int16 CT, a float32 CT, a uint8 mask on the CT's grid) are
mutated: NIfTI-1 header fields (dim, pixdim, datatype, bitpix, vox_offset, scl_slope / scl_inter,
qform / sform, magic, ...) and raw bytes (overwritten, truncated), before and after gzip. Every
mutated file goes through what the stages do with a CT (`segment.check_ct`: header, memory cap,
completeness, finite values; `read_image` + `image_array`: the features stage; `read_ct_grid`: the
regions stage) and with a mask (`regions.merge_volume` on a mask folder holding it: the libdeflate
fast path, or SimpleITK with resampling). Each example must end in a valid read or the project's `InputError`:

- never another exception (reported with its traceback),
- never a crash of the interpreter: the reads run in a worker process; if it dies (e.g. a segfault
  in a C library) the example fails with the signal,
- never a hang: each example has a 60 s limit (the worker is killed after it),
- never an allocation beyond the cap: the reads get a cap of 16 MiB per image (`read_image`'s
  `max_bytes`, the stages' memory cap); the worker's address space is limited (RLIMIT_AS) to what it
  had after start-up plus 1 GiB, an out-of-memory error anywhere fails the example, and the worker's
  peak resident memory must stay within 4 x the cap of its start-up peak.

Bounded: 4 properties x 250 examples by default (MEDREGION_FUZZ_EXAMPLES overrides), derandomised
(the same examples every run, so CI is reproducible), no example database. The number of examples
run is printed and written to `<basetemp>/fuzz_examples.json`.
"""

from __future__ import annotations

import gzip
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CAP_BYTES = 16 * 2**20
EXAMPLES = int(os.environ.get("MEDREGION_FUZZ_EXAMPLES", "250"))
EXAMPLE_TIMEOUT_S = 60.0
VID = "fuzz_1_a_1"
SHAPE = (6, 8, 10)  # z, y, x

# NIfTI-1 header fields: name -> (byte offset, struct format)
FIELDS: dict[str, tuple[int, str]] = {
    "sizeof_hdr": (0, "i"),
    "dim_info": (39, "B"),
    **{f"dim{i}": (40 + 2 * i, "h") for i in range(8)},
    "intent_code": (68, "h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    **{f"pixdim{i}": (76 + 4 * i, "f") for i in range(8)},
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "xyzt_units": (123, "B"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    **{f"quatern{c}": (256 + 4 * i, "f") for i, c in enumerate("bcd")},
    **{f"qoffset{c}": (268 + 4 * i, "f") for i, c in enumerate("xyz")},
    **{f"srow{r}{i}": (280 + 16 * k + 4 * i, "f") for k, r in enumerate("xyz") for i in range(4)},
    "magic": (344, "i"),
    "extension": (348, "i"),
}
INT_LIMITS = {"h": (-(2**15), 2**15 - 1), "i": (-(2**31), 2**31 - 1), "B": (0, 255)}
SPECIAL_INTS = [0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 64, 128, 255, 256, 348, 352, 512, 768, 1024, 1280, 1536,
                2048, 2304, 32767, -32768, 540, 0x00322B6E, 0x0031696E]
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 352.0, 353.0, 1e-30, 1e30, -1e30, 3.4e38, 1e9, float("nan"),
                  float("inf"), float("-inf")]


# ---- the worker: runs the reads, in its own process -----------------------------------------------


def _worker() -> None:
    """Serve read requests (one JSON line each) on stdin; answer one JSON line each on stdout."""
    import resource

    import SimpleITK as sitk

    from pipeline import regions, segment
    from pipeline.io import InputError, image_array, read_image

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not break the protocol

    def vm_bytes() -> int:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        return 0

    def peak_rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def read_ct(path: Path) -> None:
        segment.check_ct(VID, path, CAP_BYTES)
        image_array(read_image(path, VID, max_bytes=CAP_BYTES), path, VID, np.float32)
        regions.read_ct_grid(path, VID, CAP_BYTES, 1)

    table = regions.LabelTable.load(Path(__file__).resolve().parents[1] / "config" / "regions.yaml")

    def read_mask(path: Path, ct: Path) -> None:
        regions.merge_volume(VID, ct, path.parent, table, 1, memory_cap_bytes=CAP_BYTES)

    def serve(request: dict) -> dict:
        path = Path(request["path"])
        try:
            if request["kind"] == "mask":
                read_mask(path, Path(request["ct"]))
            else:
                read_ct(path)
        except InputError as exc:
            return {"result": "input_error", "message": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails
            return {"result": "other", "message": "".join(traceback.format_exception(exc))[-3000:]}
        return {"result": "ok", "message": ""}

    warm = json.loads(sys.stdin.readline())  # a valid CT: imports and first allocations done
    serve(warm)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 2**30, resource.RLIM_INFINITY))
    base_peak = peak_rss()
    out.write(json.dumps({"ready": True, "base_peak": base_peak}) + "\n")
    out.flush()
    for line in sys.stdin:
        answer = serve(json.loads(line))
        answer["peak_growth"] = peak_rss() - base_peak
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
    sys.exit(0)


class ReadWorker:
    """The worker process, restarted after a crash or a hang."""

    def __init__(self, warm_path: Path) -> None:
        self.warm_path = warm_path
        self.proc: subprocess.Popen[str] | None = None
        self.count = 0
        self.outcomes: dict[str, int] = {}

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     encoding="utf-8", errors="replace", env=env,
                                     cwd=str(Path(__file__).resolve().parents[1]))
        ready = self._ask({"kind": "ct", "path": str(self.warm_path)}, timeout=120)
        assert ready.get("ready"), ready

    def _ask(self, request: dict, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return {"result": "hang", "message": f"no answer in {timeout:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            self.proc = None
            return {"result": "crash", "message": f"the reading process died (exit status {code})"}
        return json.loads(line)

    def read(self, path: Path, kind: str = "ct", ct: Path | None = None) -> dict:
        if self.proc is None:
            self.start()
        self.count += 1
        answer = self._ask({"kind": kind, "path": str(path), "ct": str(ct) if ct else ""}, EXAMPLE_TIMEOUT_S)
        self.outcomes[answer["result"]] = self.outcomes.get(answer["result"], 0) + 1
        return answer

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# ---- fixtures: the valid files that get mutated ---------------------------------------------------


def _nifti_bytes(folder: Path, array: np.ndarray, spacing=(0.8, 0.7, 2.5), origin=(-40.0, -30.0, 10.0)) -> bytes:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path = folder / "base.nii"
    sitk.WriteImage(image, str(path))
    return path.read_bytes()


class Bases(dict):
    """The valid files (a dict); a short repr keeps hypothesis' falsifying-example reports readable."""

    def __repr__(self) -> str:
        return f"<valid base files in {self.get('folder')}>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    ct16 = rng.integers(-1000, 1500, SHAPE).astype(np.int16)
    ct32 = ct16.astype(np.float32) + 0.25
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:5, 3:6, 2:8] = 1
    raw = {name: _nifti_bytes(folder, a) for name, a in (("ct_i16", ct16), ("ct_f32", ct32), ("mask_u8", mask))}
    grid_ct = folder / "grid_ct.nii.gz"
    grid_ct.write_bytes(gzip.compress(raw["ct_i16"], mtime=0))
    return Bases(folder=folder, raw=raw, grid_ct=grid_ct)


@pytest.fixture(scope="module")
def worker(bases: dict[str, object]):
    w = ReadWorker(Path(str(bases["grid_ct"])))
    yield w
    w.stop()
    counts = RUN_COUNTS
    record = Path(str(bases["folder"])).parent / "fuzz_examples.json"
    record.write_text(json.dumps({"examples": w.count, "per_property": counts, "outcomes": w.outcomes}, indent=2),
                      encoding="utf-8")
    print(f"\nfuzz: {w.count} examples run {counts}, outcomes {w.outcomes}")


RUN_COUNTS: dict[str, int] = {}


# ---- mutations ------------------------------------------------------------------------------------


def _value(fmt: str) -> st.SearchStrategy:
    if fmt == "f":
        return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(width=32, allow_nan=True, allow_infinity=True))
    lo, hi = INT_LIMITS[fmt]
    return st.one_of(st.sampled_from([v for v in SPECIAL_INTS if lo <= v <= hi]), st.integers(lo, hi))


header_mutation = st.sampled_from(sorted(FIELDS)).flatmap(lambda name: st.tuples(st.just(name), _value(FIELDS[name][1])))
header_mutations = st.lists(header_mutation, min_size=1, max_size=4)
byte_mutations = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=0, max_size=6)
truncation = st.one_of(st.none(), st.floats(0, 1, exclude_max=True))


def mutate_header(data: bytes, mutations: list[tuple[str, float]]) -> bytes:
    buf = bytearray(data)
    for name, value in mutations:
        offset, fmt = FIELDS[name]
        struct.pack_into("<" + fmt, buf, offset, value)
    return bytes(buf)


def mutate_bytes(data: bytes, flips: list[tuple[float, int]], cut: float | None, start: int = 0) -> bytes:
    buf = bytearray(data)
    for where, value in flips:
        buf[start + int(where * (len(buf) - start))] = value
    if cut is not None:
        buf = buf[: int(cut * len(buf))]
    return bytes(buf)


def _check(answer: dict, path: Path) -> None:
    if answer["result"] not in ("ok", "input_error"):
        keep = path.parent.parent / f"failing-{answer['result']}-{path.name}"
        shutil.copyfile(path, keep)
        pytest.fail(f"{answer['result']} reading a mutated file (kept as {keep}):\n{answer['message']}")
    if answer["result"] == "input_error":
        assert VID in answer["message"] and path.name in answer["message"], answer["message"]
        assert not any(w in answer["message"] for w in ("bad_alloc", "MemoryError", "Unable to allocate")), answer
    assert answer.get("peak_growth", 0) <= 4 * CAP_BYTES, f"peak memory grew by {answer['peak_growth']} bytes"


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("MEDREGION_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def _count(name: str) -> None:
    RUN_COUNTS[name] = RUN_COUNTS.get(name, 0) + 1


# ---- properties -----------------------------------------------------------------------------------


@FUZZ
@given(base=st.sampled_from(["ct_i16", "ct_f32"]), gz=st.booleans(), mutations=header_mutations)
def test_header_mutations_of_a_ct(bases, worker, base: str, gz: bool, mutations) -> None:
    _count("ct_header")
    data = mutate_header(bases["raw"][base], mutations)
    path = Path(str(bases["folder"])) / ("ct.nii.gz" if gz else "ct.nii")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    _check(worker.read(path), path)


@FUZZ
@given(base=st.sampled_from(["ct_i16", "ct_f32"]), gz=st.booleans(), flips=byte_mutations, cut=truncation,
       header_only=st.booleans())
def test_byte_mutations_of_a_ct(bases, worker, base: str, gz: bool, flips, cut, header_only: bool) -> None:
    _count("ct_bytes")
    raw = bases["raw"][base]
    if gz:  # bytes of the compressed stream (gzip header, deflate blocks, CRC, length)
        data = mutate_bytes(gzip.compress(raw, mtime=0), flips, cut)
    else:
        data = mutate_bytes(raw[:352] if header_only else raw, flips, cut)
        data = data + raw[352:] if header_only else data
    path = Path(str(bases["folder"])) / ("ctb.nii.gz" if gz else "ctb.nii")
    path.write_bytes(data)
    _check(worker.read(path), path)


def _mask_file(bases, gz: bool) -> Path:
    """The one structure file (`lung`) of the fuzzed volume's mask folder."""
    folder = Path(str(bases["folder"])) / f"seg_{VID}"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    return folder / ("lung.nii.gz" if gz else "lung.nii")


@FUZZ
@given(gz=st.booleans(), mutations=header_mutations)
def test_header_mutations_of_a_mask(bases, worker, gz: bool, mutations) -> None:
    _count("mask_header")
    data = mutate_header(bases["raw"]["mask_u8"], mutations)
    path = _mask_file(bases, gz)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    _check(worker.read(path, "mask", Path(str(bases["grid_ct"]))), path)


@FUZZ
@given(gz=st.booleans(), flips=byte_mutations, cut=truncation)
def test_byte_mutations_of_a_mask(bases, worker, gz: bool, flips, cut) -> None:
    _count("mask_bytes")
    raw = bases["raw"]["mask_u8"]
    data = mutate_bytes(gzip.compress(raw, mtime=0) if gz else raw, flips, cut)
    path = _mask_file(bases, gz)
    path.write_bytes(data)
    _check(worker.read(path, "mask", Path(str(bases["grid_ct"]))), path)


def test_header_beyond_the_cap_is_refused_before_allocation(bases, worker) -> None:
    """A 2 KB file whose header declares 30000^3 voxels: refused from the header, no allocation."""
    _count("cap")
    data = mutate_header(bases["raw"]["ct_i16"], [("dim1", 30000), ("dim2", 30000), ("dim3", 30000)])
    for gz in (False, True):
        path = Path(str(bases["folder"])) / ("huge.nii.gz" if gz else "huge.nii")
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
        answer = worker.read(path)
        assert answer["result"] == "input_error" and "cap" in answer["message"], answer
        assert answer["peak_growth"] <= CAP_BYTES
