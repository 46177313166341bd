"""The fixtures the test modules share (the plain helpers are in helpers.py): the reference data, the tiny
model of the model tests, the end-to-end demo run and a one-node SLURM cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import N_TRAIN, N_VOL, SENTENCES, SHARED_DATA, C, no_network_prefix, snakemake
from slurm_cluster import SessionSlurm, readers_last


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Feature shard, attribute and report parquets, tiny LLM folder (helpers.py: make_model, make_dataset)."""
    import pandas as pd

    from model.demo_llm import build_demo_llm
    from model.prompt import format_structured
    from pipeline.constants import REGIONS
    from pipeline.feature_store import write_feature_shard

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    ids = [f"vol{i:03d}" for i in range(N_VOL)]
    rows, attrs = [], []
    arrays = {
        k: [] for k in ("global", "region", "mask_pooled", "mask_grid", "region_slices", "mask_present")
    }
    for i, vid in enumerate(ids):
        cls = i % 3  # the features carry the lung finding's class
        r = {reg: SENTENCES[reg][i % len(SENTENCES[reg])] for reg in REGIONS}
        r["findings"] = " ".join(t for t in r.values() if t)
        rows.append({"volume_id": vid, **r})
        attrs.append(
            {
                "volume_id": vid,
                "prompt": f"Organ Volumes:\nLung:\n- Right Upper Lobe: {1000 + i} ml\n"
                "Lesion Details:\nNodule:\n"
                f"- count: {cls}\n- location: " + ", ".join(["right upper lobe"] * (i % 4 + 1)),
                "liver_volume": 1500.0 + i,
            }
        )
        arrays["global"].append(rng.normal(cls, 1, (32, C)))
        arrays["region"].append(rng.normal(cls, 1, (324, C)))
        arrays["mask_pooled"].append(rng.normal(cls, 1, (9, 4, C)))
        arrays["mask_grid"].append(rng.random((9, 4, 8, 8)) > 0.5)
        arrays["region_slices"].append(np.arange(6))
        present = np.ones(9, bool)
        present[6 + cls % 3] = False
        arrays["mask_present"].append(present)
    arrays = {k: np.stack(v) for k, v in arrays.items()}
    write_feature_shard(root / "shard-0.zarr", ids, arrays, {"hidden_size": C, "encoder": "test"})
    df = pd.DataFrame(rows)
    df.iloc[:N_TRAIN].to_parquet(root / "train.parquet")
    df.iloc[N_TRAIN:].to_parquet(root / "val.parquet")
    pd.DataFrame(attrs).to_parquet(root / "attributes.parquet")
    texts = list(df["findings"]) + [format_structured(r) for r in rows]
    build_demo_llm(root / "llm", texts * 3, vocab_size=400, hidden_size=32, layers=2, heads=4, seed=0)
    return root


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The end-to-end demo workflow, run once per test session; returns its working directory."""
    import time

    workdir = tmp_path_factory.mktemp("workflow")
    t0 = time.perf_counter()
    # offline by construction: the whole demo runs with no network at all (where unshare works)
    snakemake(workdir, "all", offline=True)
    (workdir / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n", encoding="utf-8")
    (workdir / "network.txt").write_text("none\n" if no_network_prefix() else "host\n", encoding="utf-8")
    return workdir


# ---- a real one-node SLURM cluster (tests/slurm_cluster.py), shared by the session -----------------
# The whole demo through SLURM spends most of its wall time in the executor's squeue backoff, not on
# the CPUs: it starts in a background thread as soon as the session's tests are known, and the tests
# that read it go last, so the tests before them fill that wait.

SESSION_SLURM = SessionSlurm()
SLURM_DEMO_USERS = {"slurm_run", "second_run"}  # fixtures that need the session's SLURM demo


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start only for the tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ordered = readers_last(items, SLURM_DEMO_USERS)
    if ordered is None or config.option.collectonly:
        return
    items[:] = ordered
    SESSION_SLURM.start_demo()


def pytest_sessionfinish(session: pytest.Session) -> None:
    SESSION_SLURM.stop()


@pytest.fixture(scope="session")
def cluster():
    """The session's cluster, once the background demo (if any) has finished: tests that submit
    jobs of their own do not share it with that run."""
    return SESSION_SLURM.cluster()


@pytest.fixture(scope="session")
def slurm_run(cluster):
    """The whole demo from nothing through the SLURM profile, one features job killed mid-run and
    retried. tests/test_slurm.py checks the scheduling; tests/test_determinism.py compares its outputs
    with `demo_run`'s (so the session runs the demo twice, not three times)."""
    return SESSION_SLURM.demo()
