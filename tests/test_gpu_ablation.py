"""benchmarks/gpu_ablation.py: the bundle the GPU machine reads without zarr, the device step's stand-ins,
the prediction table, the paired test, and the three steps end to end on CPU (`--tiny`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_ablation as ga  # noqa: E402

PREDICTIONS_MD = REPO / "benchmarks" / "ablation_predictions.md"


def _stand_in_env(tmp_path: Path) -> dict:
    stand_ins = ga.write_stand_ins(tmp_path / "stand_ins")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(stand_ins), str(REPO)])}


def _shard(path: Path, n: int = 3, compressor: str = "lz4") -> dict[str, np.ndarray]:
    from pipeline.feature_store import write_feature_shard

    rng = np.random.default_rng(0)
    arrays = {"global": rng.normal(size=(n, 4, 6)).astype(np.float16),
              "region": rng.normal(size=(n, 6, 6)).astype(np.float16),
              "mask_pooled": rng.normal(size=(n, 9, 2, 6)).astype(np.float16),
              "mask_grid": (rng.random(size=(n, 9, 2, 4, 4)) < 0.1).astype(np.float16),
              "region_slices": np.arange(n * 6, dtype=np.int16).reshape(n, 6),
              "mask_present": rng.random((n, 9)) < 0.5}
    write_feature_shard(path, [f"v{i}" for i in range(n)], arrays, {"pooling": "r2", "encoder": "e"},
                        compressor=compressor)
    return arrays


_READ = """
import json, sys
import numpy as np
from pipeline.feature_store import FeatureStore
st = FeatureStore([sys.argv[1]])
print(json.dumps({v: {k: np.asarray(a, np.float32).ravel().tolist() for k, a in st[v].items()} for v in st.volume_ids}))
print(json.dumps({"zarr": sys.modules["zarr"].__file__}))
"""


def test_repacked_shard_reads_without_zarr_with_the_same_values(tmp_path):
    arrays = _shard(tmp_path / "lz4.zarr")
    assert ga._repack_features(tmp_path / "lz4.zarr", tmp_path / "none.zarr") == 3
    env = _stand_in_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _READ, str(tmp_path / "none.zarr")], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", check=True, cwd=tmp_path)
    out, where = map(json.loads, proc.stdout.splitlines())
    assert "stand_ins" in where["zarr"]  # the stand-in, not the installed zarr, was imported
    for i, v in enumerate(["v0", "v1", "v2"]):
        for k, a in arrays.items():
            assert np.array_equal(np.asarray(out[v][k], np.float32), np.asarray(a[i], np.float32).ravel()), (v, k)
    # the compressed original needs numcodecs' blosc or zarr: under the stand-ins it must fail, loudly
    bad = subprocess.run([sys.executable, "-c", _READ, str(tmp_path / "lz4.zarr")], env={
        **env, "PYTHONPATH": env["PYTHONPATH"] + os.pathsep + str(ga.write_stand_ins(tmp_path / "more", ("numcodecs",)))},
        capture_output=True, encoding="utf-8", errors="replace", cwd=tmp_path)
    assert bad.returncode != 0 and "import-only stand-in" in bad.stderr


def test_the_model_stages_import_with_the_stand_ins_and_without_the_missing_packages(tmp_path):
    # what model.train's and model.generate's main() import when they run: pipeline.skipped (pipeline.io ->
    # SimpleITK) and, where the cache is read, pipeline.feature_store (zarr)
    code = ("import sys, json; import model.train, model.generate, model.demo_llm, model.data, model.network\n"
            "import pipeline.skipped, pipeline.feature_store\n"
            "print(json.dumps({n: getattr(sys.modules.get(n), '__file__', None) for n in "
            "('zarr', 'SimpleITK', 'numcodecs', 'snakemake', 'nibabel')}))")
    proc = subprocess.run([sys.executable, "-c", code], env=_stand_in_env(tmp_path), capture_output=True,
                          encoding="utf-8", errors="replace", check=True, cwd=tmp_path)
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert "stand_ins" in loaded["zarr"] and "stand_ins" in loaded["SimpleITK"]
    assert loaded["numcodecs"] is None and loaded["snakemake"] is None and loaded["nibabel"] is None


def test_plan_trains_what_the_workflow_would():
    config = ga.merged_config(list(ga.KNOWN_ANSWER_CONFIGS))
    plan = ga.plan_from_config(config, [0, 1, 2])
    assert list(plan["experiments"]) == list(ga.EXPERIMENTS)
    # train.smk's train_params: {**train.stage<k>, **experiment}
    assert plan["train"]["lita"]["stage2"] == {**config["train"]["stage2"], **config["experiments"]["lita"]}
    assert plan["train"]["r2_attr"]["stage1"]["use_mask_tokens"] is False
    # the overlays' order: 4 x 256 LM at init 0.08, stage 2 cut to 27 epochs by known_answer.yaml
    assert (plan["llm"]["hidden_size"], plan["llm"]["layers"], plan["llm"]["init_std"]) == (256, 4, 0.08)
    assert plan["train"]["full"]["stage2"]["epochs"] == 27 and plan["train"]["full"]["stage2"]["feature_norm"]
    assert plan["cohort"]["n_cases"] == 300 and plan["seeds"] == [0, 1, 2]
    targets = ga.data_targets(config)
    assert sum("-lita/" in t for t in targets) == sum("-r2/" in t for t in targets) == 6


def test_the_committed_predictions_cover_every_planted_class_and_experiment():
    from demo_learning import PLANTED

    from pipeline.demo.findings import FINDING_WEIGHTS

    table = ga.read_predictions_table(PREDICTIONS_MD)
    config = ga.merged_config(list(ga.KNOWN_ANSWER_CONFIGS))
    planted = [c for c in PLANTED if c in config["dataset"]["demo"]["findings"]]
    assert set(table) == set(planted) and all(c in FINDING_WEIGHTS for c in table)
    for row in table.values():
        assert list(row) == list(ga.EXPERIMENTS) and row["full"] == "ref"
        assert set(row.values()) <= {"ref", "stay", "fall"}
    # the rule the table states: an ablation keeps a class where a prompt part it keeps reaches a
    # ceiling of 0.85 alone on the committed per-input measurement, and loses it otherwise
    ceiling = json.loads((REPO / "benchmarks" / "results" / "known_answer_ceiling_120_cpu.json").read_text())
    for cls, row in table.items():
        f1 = {g: ceiling["ceiling_by_inputs"][g]["per_class"][cls]["f1_cv_chosen"]
              for g in ("image", "image_lita", "mask", "attributes")}
        kept = {"r2_mask": max(f1["image"], f1["mask"]), "r2_attr": max(f1["image"], f1["attributes"]),
                "r2": f1["image"], "lita": f1["image_lita"]}
        for exp, best in kept.items():
            assert (row[exp] == "stay") == (best >= 0.85), (cls, exp, best, row[exp])


def test_a_prediction_table_with_an_unknown_word_is_refused(tmp_path):
    bad = tmp_path / "p.md"
    bad.write_text("| class | full | r2_mask | r2_attr | r2 | lita |\n|---|---|---|---|---|---|\n"
                   "| Lung nodule | ref | stay | maybe | fall | fall |\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="'maybe' is not stay / fall / ref"):
        ga.read_predictions_table(bad)


def test_paired_permutation_test_separates_a_real_difference_from_none():
    rng = np.random.default_rng(0)
    ref = rng.random((60, 3)) < 0.4
    noisy = ref ^ (rng.random((60, 3)) < 0.05)
    blind = np.zeros_like(ref)
    assert ga.paired_permutation_p(ref, noisy, blind, [0, 1, 2]) < 0.01
    assert ga.paired_permutation_p(ref, noisy, noisy, [0, 1, 2]) == 1.0
    half = noisy.copy()
    half[:2] = ~half[:2]  # two volumes differ: no evidence
    assert ga.paired_permutation_p(ref, noisy, half, [0, 1, 2]) > 0.2


@pytest.mark.timeout(1500)
def test_tiny_mode_runs_the_three_steps_end_to_end_on_cpu(tmp_path):
    """The whole script on 20 volumes: data stages through the workflow, the bundle, the device step on
    CPU (stand-ins for zarr and SimpleITK, five experiments as concurrent processes), scoring with the
    METEOR jar; every experiment predicts every test volume."""
    import pandas as pd

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_ablation.py"), "--tiny", "--keep", str(tmp_path)],
                          capture_output=True, encoding="utf-8", errors="replace", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert list(result["table"]) == list(ga.EXPERIMENTS)
    test_ids = set(pd.read_parquet(tmp_path / "data" / "results" / "reports" / "test.parquet")["volume_id"])
    for exp in ga.EXPERIMENTS:
        pred = pd.read_parquet(tmp_path / "device" / "runs" / "seed0" / exp / "predictions.parquet")
        assert set(pred["volume_id"]) == test_ids
        run = result["runs"][f"seed0/{exp}"]
        assert run["status"] == "done" and run["meteor"] is not None and run["rouge_l"] is not None
        if exp != "full":
            assert 0 < run["paired_p_vs_full"] <= 1
    # the lita runs read the lita cache, the others the r2 one
    cfg = json.loads((tmp_path / "device" / "runs" / "seed0" / "lita" / "stage2" / "medregion_config.json").read_text())
    assert cfg["pooling"] == "lita"
    assert "bundle" in proc.stdout and "MiB" in proc.stdout
    # the thread counts the device step sets must be ones the OpenMP runtime accepts
    logs = [p.read_text(errors="replace") for p in (tmp_path / "device" / "runs").rglob("*.log")]
    assert len(logs) == 6 and not any("Invalid value for environment variable" in t for t in logs)


def test_runs_past_the_deadline_are_stopped_and_later_ones_not_started(tmp_path):
    import time

    runs = ga._Runs(dict(os.environ), deadline=time.time() + 2.0)
    t0 = time.perf_counter()
    assert runs.run([sys.executable, "-c", "pass"], tmp_path / "ok.log") is True
    assert runs.run([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "slow.log") is False
    assert time.perf_counter() - t0 < 30 and runs.expired
    assert runs.run([sys.executable, "-c", "pass"], tmp_path / "late.log") is False
    assert not (tmp_path / "late.log").exists()
    fresh = ga._Runs(dict(os.environ), deadline=time.time() + 60.0)
    assert fresh.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "f.log") is False and not fresh.expired


def test_collect_packs_the_runs_that_finished_and_marks_the_rest(tmp_path):
    import tarfile

    import pandas as pd

    work = tmp_path / "work"
    (work / "bundle").mkdir(parents=True)
    plan = {"experiments": {"full": {}, "r2": {}}, "seeds": [0]}
    (work / "bundle" / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    done = work / "runs" / "seed0" / "full"
    (done / "stage2").mkdir(parents=True)
    pd.DataFrame({"volume_id": ["v1"], "report": ["x"]}).to_parquet(done / "predictions.parquet")
    (done / "stage2" / "train_log.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    (done / "stage2" / "model.safetensors").write_bytes(b"not packed")
    running = work / "runs" / "seed0" / "r2"
    running.mkdir(parents=True)
    (running / "run.log").write_text("stage 2: 10%\n", encoding="utf-8")

    summary = ga.collect(work, tmp_path / "out")

    assert summary["status"] == {"seed0/full": "done", "seed0/r2": "not finished when collected"}
    with tarfile.open(tmp_path / "out" / ga.PREDICTIONS_FILE) as tar:
        names = set(tar.getnames())
    assert {"device_summary.json", "seed0/full/predictions.parquet", "seed0/full/stage2/train_log.jsonl",
            "seed0/r2/run.log"} <= names
    assert "seed0/full/stage2/model.safetensors" not in names
    assert json.loads((tmp_path / "out" / "device_summary.json").read_text())["seeds"] == [0]


def test_collect_refuses_a_folder_without_runs(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "plan.json").write_text(json.dumps({"experiments": {"full": {}}}), encoding="utf-8")
    with pytest.raises(SystemExit, match="no runs/seed"):
        ga.collect(tmp_path, tmp_path / "out")
    (tmp_path / "runs" / "seed0").mkdir(parents=True)
    (tmp_path / "bundle" / "plan.json").unlink()
    with pytest.raises(SystemExit, match="no bundle/plan.json"):
        ga.collect(tmp_path, tmp_path / "out")


def _fake_bundle(path: Path, experiments: list[str], extra: str = "") -> Path:
    import tarfile

    src = path.parent / (path.name + ".src") / "bundle"
    src.mkdir(parents=True)
    stage = {"epochs": 1, "batch_size": 2}
    plan = {"experiments": {e: {"pooling": "lita" if e == "lita" else "r2"} for e in experiments}, "seeds": [0],
            "llm": {"hidden_size": 8, "layers": 1, "vocab_size": 50, "pretrain_steps": 1, "init_std": 0.02,
                    "attribute_text": False},
            "train": {e: {"stage1": stage, "stage2": stage} for e in experiments},
            "generate": {"max_new_tokens": 8, "batch_size": 2}, "extra": extra}
    (src / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname="bundle")
    return path


def test_device_runs_only_the_named_experiments_and_a_rerun_reuses_what_is_done(tmp_path, monkeypatch):
    """The device step's bookkeeping with the model stages replaced by stubs that write each step's
    completion mark: --experiments restricts the runs, a second call on the same --work folder reuses the
    demo LM and the finished run and runs only the rest, and the packed summary covers every experiment."""
    import tarfile

    import pandas as pd

    calls: list[list[str]] = []

    def fake_run(self, cmd, log, env=None):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        if "model.demo_llm" in cmd:
            out.mkdir(parents=True)
            (out / "config.json").write_text("{}", encoding="utf-8")
        elif "model.train" in cmd:
            assert "--resume" in cmd
            out.mkdir(parents=True, exist_ok=True)
            (out / "medregion_config.json").write_text("{}", encoding="utf-8")
        else:
            pd.DataFrame({"volume_id": ["v1"], "report": ["x"]}).to_parquet(out)
        return True

    monkeypatch.setattr(ga._Runs, "run", fake_run)
    bundle = _fake_bundle(tmp_path / "b.tar.gz", ["full", "r2"])
    work = tmp_path / "work"

    first = ga.device(bundle, tmp_path / "out1", "cpu", 60.0, work=work, experiments=["r2"])
    assert first["status"]["seed0/r2"] == "done"
    assert first["status"]["seed0/full"] == "not run (--experiments)"
    assert [c[2] for c in calls] == ["model.demo_llm", "model.train", "model.train", "model.generate"]
    assert all("/full/" not in " ".join(c) for c in calls)

    calls.clear()
    second = ga.device(bundle, tmp_path / "out2", "cpu", 60.0, work=work)
    assert [c[2] for c in calls] == ["model.train", "model.train", "model.generate"]  # no demo LM, no r2
    assert all("/full/" in c[c.index("--out") + 1].replace(os.sep, "/") for c in calls)
    assert second["status"] == {"seed0/demo_llm": "done", "seed0/full": "done", "seed0/r2": "done"}
    assert second["timings"]["seed0/r2"] == {"reused": ["stage1", "stage2", "generate"]}
    with tarfile.open(tmp_path / "out2" / ga.PREDICTIONS_FILE) as tar:
        names = set(tar.getnames())
    assert {"seed0/full/predictions.parquet", "seed0/r2/predictions.parquet"} <= names

    with pytest.raises(SystemExit, match="no experiment r2_atr; it has full, r2"):
        ga.device(bundle, tmp_path / "out3", "cpu", 60.0, work=work, experiments=["r2_atr"])
    other = _fake_bundle(tmp_path / "other.tar.gz", ["full", "r2"], extra="another cohort")
    with pytest.raises(SystemExit, match="runs of another bundle"):
        ga.device(other, tmp_path / "out4", "cpu", 60.0, work=work)
