"""Plain helpers the tests share (the fixtures are in conftest.py): writing NIfTI files, running the workflow,
the tiny model of the model tests (fixture `tiny`), and hand-made evaluation inputs.

Imports of torch, transformers and the model package happen inside the helpers that need them, so that a
module importing this one does not pay for them.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
E2E_CONFIG = REPO / "tests" / "data" / "e2e_config.yaml"


def write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """Write a (z, y, x) array as a NIfTI with the given geometry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_box_masks(folder: Path, shape: tuple[int, int, int], names: list[str], seed: int, start_max: int,
                    length_max: tuple[int, int, int]) -> Path:
    """A zero int16 CT `folder/v.nii.gz` and one random 0/1 box mask per name in `folder/seg`
    (corner below `start_max` on each axis, side below `length_max`); returns the CT's path."""
    rng = np.random.default_rng(seed)
    ct = write_image(folder / "v.nii.gz", np.zeros(shape, np.int16))
    for name in names:
        m = np.zeros(shape, np.uint8)
        z, y, x = rng.integers(0, start_max, 3)
        m[z : z + rng.integers(1, length_max[0]), y : y + rng.integers(1, length_max[1]),
          x : x + rng.integers(1, length_max[2])] = 1
        write_image(folder / "seg" / f"{name}.nii.gz", m)
    return ct


def split_labelmap(labelmap: Path, names: dict[int, str], folder: Path) -> Path:
    """A label map as per-structure files, one binary file per class, empty ones included (what
    TotalSegmentator writes without --ml); returns the folder."""
    image = sitk.ReadImage(str(labelmap))
    lab = sitk.GetArrayFromImage(image)
    folder.mkdir(parents=True)
    for idx, name in names.items():
        mask = sitk.GetImageFromArray((lab == idx).astype(np.uint8))
        mask.CopyInformation(image)
        sitk.WriteImage(mask, str(folder / f"{name}.nii.gz"), useCompression=True)
    return folder


def no_network_prefix() -> list[str]:
    """`unshare -n`: run in a fresh network namespace with no route anywhere, when we may."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return ["unshare", "-n"] if probe.returncode == 0 else []


def snakemake_command(workdir: Path, *args: str, env: dict[str, str] | None = None, offline: bool = False,
                      configfiles: Sequence[Path] = (E2E_CONFIG,)) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `snakemake()` (which documents the arguments)."""
    prefix = no_network_prefix() if offline else []
    cmd = [*prefix, sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", *map(str, configfiles), "--cores", "2", *args]
    return cmd, {**(env or os.environ), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
              timeout: float = 1800, offline: bool = False,
              configfiles: Sequence[Path] = (E2E_CONFIG,)) -> subprocess.CompletedProcess[str]:
    """Run the project's workflow in `workdir` with `configfiles` over config/config.yaml (default: the
    end-to-end test config); `check` raises with Snakemake's output when it fails.

    `offline=True` runs it in a network namespace of its own (nothing reachable), where possible.
    """
    cmd, env = snakemake_command(workdir, *args, env=env, offline=offline, configfiles=configfiles)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def huge_header_copy(src: Path, dst: Path, dims: tuple[int, int, int]) -> Path:
    """A copy of a small NIfTI whose header claims `dims` voxels (the voxel data is not there)."""
    raw = bytearray(gzip.decompress(src.read_bytes()))
    raw[42:48] = struct.pack("<3h", *dims)
    dst.write_bytes(gzip.compress(bytes(raw)))
    return dst


# ---- the tiny model (fixture `tiny` in conftest.py): a tiny Llama (hidden 32, 2 layers) with a tokenizer
# trained on the reports, and a feature shard with C = 16 -----------------------------------------------

C = 16
N_VOL = 12
N_TRAIN = 8

SENTENCES = {
    "lung": ["The lungs are clear.", "A nodule in the right upper lobe.", "Emphysema in both lungs."],
    "airways": ["Trachea and main bronchi are patent.", "Peribronchial thickening is seen."],
    "mediastinum": ["No lymphadenopathy.", "Enlarged mediastinal lymph nodes."],
    "heart": ["Heart size is normal.", "Cardiomegaly is present.", "Heart size is normal."],
    "osseous": ["No lytic lesion.", ""],
    "abdomen": ["Liver is normal.", "A cyst in the left kidney."],
}


def make_config(tiny, stage=2, **kw):
    from model.network import MedRegionCTConfig

    base = {
        "llm_path": str(tiny / "llm"),
        "encoder_hidden": C,
        "mask_grid": (4, 8, 8),
        "mask_hidden": 24,
        "stage": stage,
        "lora_r": 4,
        "lora_alpha": 8,
    }
    base.update(kw)
    return MedRegionCTConfig(**base)


def make_model(tiny, stage=2, **kw):
    import torch

    from model.network import MedRegionCT

    torch.manual_seed(0)
    return MedRegionCT.from_config(make_config(tiny, stage, **kw))


def make_dataset(tiny, model, reports="train.parquet", **kw):
    from model.data import build_dataset

    cfg = model.config
    args = {
        "stage": cfg.stage,
        "use_mask_tokens": cfg.prompt_uses_masks,
        "use_attributes": cfg.prompt_uses_attributes,
        "n_vision": cfg.n_vision,
    }
    args.update(kw)
    return build_dataset(
        [tiny / "shard-0.zarr"], [tiny / "attributes.parquet"], tiny / reports, model.tokenizer, **args
    )


def run_cli(module, *args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        encoding="utf-8", errors="replace",
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_args(tiny, stage, out, params, *extra):
    return [
        "--stage",
        stage,
        "--params-json",
        json.dumps(params),
        "--features",
        tiny / "shard-0.zarr",
        "--attributes",
        tiny / "attributes.parquet",
        "--train-reports",
        tiny / "train.parquet",
        "--val-reports",
        tiny / "val.parquet",
        "--llm",
        tiny / "llm",
        "--out",
        out,
        *extra,
    ]


def run_process_group(cmd, env, timeout):
    """Run cmd in its own process group; on timeout kill the whole group (launcher and every rank)."""
    import signal

    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
        start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:4]} timed out after {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def log_records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


# ---- evaluation inputs -----------------------------------------------------------------------------


def report_frames(n_orphans: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions, references): three hand-written report pairs with the rule labeler's labels on the
    references, the predictions in reverse id order, plus `n_orphans` predictions without a reference."""
    from pipeline.constants import CTRATE_CLASSES, REGIONS
    from pipeline.evaluate.labeler import label_reports

    ids = ["train_1_a_1", "train_2_a_1", "train_3_b_2"]
    ref_regions = {
        "lung": ["Millimetric nodules are observed in both lungs.", "Pleural effusion on the right.", ""],
        "airways": ["Trachea and both main bronchi are open.", "", ""],
        "mediastinum": ["", "Lymph nodes of pathological size.", ""],
        "heart": ["Heart size is normal.", "Heart size increased.", ""],
        "osseous": ["", "", "Degenerative changes in the spine."],
        "abdomen": ["", "", ""],
    }
    pred_regions = {
        "lung": ["Millimetric nodules are observed in both lungs.", "No pleural effusion.", ""],
        "airways": ["Trachea and both main bronchi are open.", "", "Trachea is open."],
        "mediastinum": ["", "Lymph nodes of pathological size.", ""],
        "heart": ["Heart size is normal.", "Heart size increased.", ""],
        "osseous": ["", "", ""],
        "abdomen": ["", "", ""],
    }

    def merged(regions, i):
        return " ".join(regions[r][i] for r in REGIONS if regions[r][i])

    findings = [merged(ref_regions, i) for i in range(3)]
    ref = pd.DataFrame({"volume_id": ids, "findings": findings, **ref_regions})
    labels = label_reports(ref["findings"].tolist())
    for k, c in enumerate(CTRATE_CLASSES):
        ref[c] = labels[:, k]
    pred = pd.DataFrame(
        {"volume_id": ids[::-1], "report": [merged(pred_regions, i) for i in range(3)][::-1],
         **{r: v[::-1] for r, v in pred_regions.items()}}
    )
    for k in range(n_orphans):
        pred.loc[len(pred)] = {"volume_id": f"valid_9{k}_a_1", "report": "Heart size increased.",
                               **{r: "" for r in REGIONS}}
    return pred, ref


def fake_metrics(name: str, b4: float, rl: float, met: float, ca: float, green: float | None = None) -> dict:
    """A metrics.json of experiment `name` with these BLEU-4, ROUGE-L, METEOR, CA-F1 (and GREEN) values."""
    from pipeline.constants import CTRATE_CLASSES

    def entry(v, impl, avg):
        return {"value": v, "implementation": impl, "averaging": avg}

    rep = {
        "BLEU-4": entry(b4, "pycocoevalcap-1.2 Bleu", "corpus"),
        "BLEU-4 report-mean": entry(b4 - 0.05, "pycocoevalcap-1.2 Bleu per pair", "report-mean"),
        "ROUGE-L": entry(rl, "ROUGE-L as pycocoevalcap Rouge", "report-mean"),
        "METEOR": entry(met, "pycocoevalcap-1.2 Meteor jar", "corpus"),
        "METEOR-NLTK report-mean": entry(met + 0.2, "NLTK-style METEOR", "report-mean"),
    }
    per_class = {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3, "predicted": 3} for c in CTRATE_CLASSES}
    per_class["Hiatal hernia"] = {"precision": None, "recall": None, "f1": None, "support": 0, "predicted": 0}
    green_block = ({"status": "not run", "reason": "GREEN adapter not configured", "value": None} if green is None
                   else {"status": "ok", "value": green, "implementation": "GREEN", "averaging": "report-mean"})
    return {
        "experiment": name,
        "n_volumes": 10,
        "nlg": {"report": rep},
        "clinical": {"labeler_vs_labeler": {"macro_f1": ca, "micro_f1": ca, "weighted_f1": ca,
                                            "per_class": per_class, "implementation": "rule labeler CA-F1"}},
        "green": green_block,
        "judge": {"status": "not run", "reason": "LLM judge not configured", "value": None},
    }


class JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint for the LLM-judge tests: `answers[prediction]` is the queue of
    replies to a request about that prediction (a text, or an HTTP status to fail with; the last one repeats)."""

    answers: dict[str, list] = {}
    seen_auth: list[str | None] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen_auth.append(self.headers.get("Authorization"))
        assert self.path == "/v1/chat/completions" and body["temperature"] == 0
        user = body["messages"][-1]["content"]
        pred = user.split("prediction: ", 1)[1].split("\n", 1)[0]
        queue = self.answers[pred]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, int):
            self.send_response(reply)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass
