"""The known-answer ablation (full, r2_mask, r2_attr, r2, lita) x model seeds, its model stages on one GPU.

Three steps, two machines (docs/ablation.md):

    # 1. here, on CPU: the workflow's data stages for the known-answer cohort, packed into one file
    python benchmarks/gpu_ablation.py prepare --workdir /tmp/ka --bundle results/gpu_ablation/bundle.tar.gz
    # 2. on the GPU machine (carry the bundle): demo LM per seed, then every (seed, experiment) as its own
    #    process, all at once on the one GPU: stage 1 -> stage 2 -> generate; predictions packed to $OUT
    python3 benchmarks/gpu_ablation.py device --bundle results/gpu_ablation/bundle.tar.gz --out $OUT
    # 3. here again (METEOR needs Java): scoring, paired tests against `full`, the table next to the
    #    predictions written down beforehand (benchmarks/ablation_predictions.md)
    python benchmarks/gpu_ablation.py score --bundle results/gpu_ablation/bundle.tar.gz \
        --predictions <files_at>/predictions.tar.gz --out benchmarks/results/ablation_known_answer.json

    python benchmarks/gpu_ablation.py --tiny [--keep DIR]   # all three on CPU: 20 volumes, one epoch
    python benchmarks/gpu_ablation.py collect --work DIR --out OUT   # pack what a long device run has finished
    python benchmarks/gpu_ablation.py device --work DIR --experiments r2_attr ...   # resume one, reusing what is done

Why a bundle and not the workflow's folders: the GPU machine has torch, transformers, peft, accelerate,
pandas and pyarrow but neither zarr (nor numcodecs) nor SimpleITK nor snakemake, and reaches no package
registry. `prepare` rewrites the feature shards uncompressed (`compressor: none`), a layout that
`pipeline.feature_store` reads with plain file reads, never calling zarr; the trainer's modules still
import zarr and SimpleITK at module level (the feature store; `pipeline.io` through `pipeline.skipped`),
so `device` puts import-only stand-ins for those two first on the path of its processes: any use of
them fails with a message naming the stand-in, so a code path that does need them cannot pass silently.
Attribute and report tables travel as the Parquet files they are. The bundle is gzip-compressed (the
sparse mask grids shrink ~10x) and must stay under the device tool's 64 MiB per call (`--max-mib`).

Model seeds follow `benchmarks/configs/model_seed_{1,2}.yaml`: seed s sets the demo LM's initialisation and
pre-training, stage 1 and stage 2. Training and generation parameters are the merged config's (the
workflow's own `train_params`: `train.stage{1,2}` updated by the experiment's keys), written into the
bundle's `plan.json`, so the GPU run trains what `snakemake all` would, only faster and concurrently.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXPERIMENTS = ("full", "r2_mask", "r2_attr", "r2", "lita")
# later files override earlier ones (one --configfile followed by all of them)
KNOWN_ANSWER_CONFIGS = (
    "config/config.yaml",
    "benchmarks/configs/feature_norm.yaml",
    "benchmarks/configs/demo_llm_4x256.yaml",
    "benchmarks/configs/known_answer.yaml",
    "benchmarks/configs/demo_llm_init_0.08.yaml",
)
TINY_CONFIGS = KNOWN_ANSWER_CONFIGS + ("benchmarks/configs/known_answer_tiny.yaml",)
DEVICE_LIMIT_MIB = 64.0
# modules the trainer's code imports at module level but the GPU image lacks (see the module docstring)
ABSENT_ON_DEVICE = ("zarr", "SimpleITK")
PREDICTIONS_FILE = "predictions.tar.gz"
FALL, STAY = 0.3, 0.1  # the check's targets: a class loses >= 0.3 F1 without its carrier, moves <= 0.1 otherwise


def _log(msg: str) -> None:
    print(f"[gpu_ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1. prepare (CPU, here) -------------------------------------------------------------------------

def merged_config(configfiles: list[str]) -> dict:
    """The config Snakemake runs with `--configfile a b c`: each file updates the previous ones."""
    import yaml
    from snakemake.utils import update_config

    config: dict = {}
    for f in configfiles:
        update_config(config, yaml.safe_load((REPO / f).read_text(encoding="utf-8")) if not Path(f).is_absolute()
                      else yaml.safe_load(Path(f).read_text(encoding="utf-8")))
    return config


def data_targets(config: dict) -> list[str]:
    """The data-stage outputs the model stages read: feature shards of every pooling an experiment uses,
    attribute shards, report splits (paths relative to the workdir, as the rules write them)."""
    res = config["results"]
    n = int(config["dataset"].get("demo", {}).get("n_cases", 80))
    shards = range(max(1, -(-n // int(config["shard_size"]))))
    poolings = sorted({e["pooling"] for e in config["experiments"].values()})
    tag = config["features"]["tag"]
    return ([f"{res}/features/{tag}-{p}/shard-{s}.zarr" for p in poolings for s in shards]
            + [f"{res}/attributes/shard-{s}.parquet" for s in shards]
            + [f"{res}/reports/{split}.parquet" for split in ("train", "validation", "test")])


def plan_from_config(config: dict, seeds: list[int]) -> dict:
    """What the device step runs: per experiment the stage-1 / stage-2 parameters as the workflow's
    `train_params` builds them, the demo LM's build options, the generation options, the seeds."""
    llm = config["llm"]
    exps = {name: config["experiments"][name] for name in EXPERIMENTS if name in config["experiments"]}
    missing = set(EXPERIMENTS) - set(exps)
    if missing:
        raise SystemExit(f"the config has no experiments {sorted(missing)}: add benchmarks/configs/known_answer.yaml")
    return {
        "experiments": exps,
        "train": {name: {f"stage{k}": {**config["train"][f"stage{k}"], **exp} for k in (1, 2)}
                  for name, exp in exps.items()},
        "llm": {"hidden_size": llm.get("demo_hidden_size", 128), "layers": llm.get("demo_layers", 2),
                "vocab_size": llm.get("demo_vocab_size", 2000), "pretrain_steps": llm.get("demo_pretrain_steps", 300),
                "init_std": llm.get("demo_init_std", 0.02), "attribute_text": bool(llm.get("demo_attribute_text", False))},
        "generate": {"max_new_tokens": config["generate"]["max_new_tokens"],
                     "batch_size": config["generate"]["batch_size"]},
        "seeds": seeds,
        "cohort": config["dataset"].get("demo", {}),
    }


def _repack_features(src: Path, dst: Path) -> int:
    """One feature shard rewritten uncompressed (read without zarr on the device); volumes written."""
    import numpy as np

    from pipeline.feature_store import FEATURE_ARRAYS, FeatureStore, write_feature_shard

    store = FeatureStore([src])
    ids = store.volume_ids
    items = [store[v] for v in ids]
    arrays = {k: np.stack([it[k] for it in items]) for k in FEATURE_ARRAYS}
    attrs = {k: v for k, v in store.attrs.items() if k != "layout"}
    write_feature_shard(dst, ids, arrays, attrs, compressor="none")
    return len(ids)


def run_data_stages(workdir: Path, configfiles: list[str], cores: int) -> float:
    """The workflow's data stages for the config's experiments in `workdir` (seconds taken)."""
    targets = data_targets(merged_config(configfiles))
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", str(cores),
           *targets, "--configfile", *[str(REPO / f) if not Path(f).is_absolute() else f for f in configfiles]]
    _log(f"data stages through the workflow ({len(targets)} targets) in {workdir}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"data stages failed (snakemake in {workdir}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def pack_bundle(workdir: Path, bundle: Path, configfiles: list[str], seeds: list[int],
                max_mib: float = DEVICE_LIMIT_MIB) -> dict:
    """The bundle the device step reads, from the data stages' outputs in `workdir`: feature shards
    rewritten uncompressed, attribute and report tables as they are, plan.json; one tar.gz."""
    from pipeline.io import atomic_output

    config = merged_config(configfiles)
    targets = data_targets(config)
    res = workdir / config["results"]
    plan = plan_from_config(config, seeds)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-ablation-pack-") as tmp:
        root = Path(tmp) / "bundle"
        n = 0
        for t in targets:
            src = workdir / t
            if t.endswith(".zarr"):
                pooling = src.parent.name.rsplit("-", 1)[1]
                n += _repack_features(src, root / "features" / pooling / src.name)
            else:
                dst = root / src.relative_to(res)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        (root / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        with atomic_output(bundle) as out, tarfile.open(out, "w:gz", compresslevel=6) as tar:
            tar.add(root, arcname="bundle")
    mib = bundle.stat().st_size / 2**20
    _log(f"bundle {bundle}: {mib:.1f} MiB ({n} volume feature rows, packed in {time.perf_counter() - t0:.0f} s; "
         f"the device tool carries {DEVICE_LIMIT_MIB:.0f} MiB with the repository, limit set {max_mib:.0f} MiB)")
    if mib > max_mib:
        bundle.unlink()
        raise SystemExit(f"{bundle}: {mib:.1f} MiB exceeds the {max_mib:.0f} MiB the device tool can carry")
    return {"bundle": str(bundle), "bundle_mib": round(mib, 2)}


def prepare(workdir: Path, bundle: Path, configfiles: list[str], seeds: list[int], cores: int,
            max_mib: float = DEVICE_LIMIT_MIB) -> dict:
    """Data stages through the workflow in `workdir`, then the bundle the device step reads."""
    data_s = run_data_stages(workdir, configfiles, cores)
    _log(f"data stages done in {data_s:.0f} s; packing")
    return {**pack_bundle(workdir, bundle, configfiles, seeds, max_mib), "data_stages_s": round(data_s, 1)}


# ---- 2. device (GPU machine; CPU in --tiny) -------------------------------------------------------------

_STAND_IN = '''"""Import-only stand-in for {name}, which this machine lacks (benchmarks/gpu_ablation.py device).

The code the ablation runs here imports {name} at module level but does not use it on this path; any
use lands here and fails."""


def __getattr__(attr):
    raise ImportError("{name}.%s used, but {name} is an import-only stand-in here "
                      "(benchmarks/gpu_ablation.py: the device step must not need {name})" % attr)
'''


def write_stand_ins(folder: Path, names=ABSENT_ON_DEVICE) -> Path:
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(_STAND_IN.format(name=name), encoding="utf-8")
    return folder


def _extract(tar_path: Path, dest: Path) -> Path:
    with tarfile.open(tar_path, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


class _Runs:
    """The child processes of the device step: started, waited for, killed together at the deadline."""

    def __init__(self, env: dict, deadline: float):
        self.env, self.deadline = env, deadline
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.expired = False

    def run(self, cmd: list[str], log: Path, env: dict | None = None) -> bool:
        with self.lock:
            if self.expired:
                return False
            with open(log, "ab") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                        cwd=REPO)
            self.procs.append(proc)
        try:
            rc = proc.wait(timeout=max(1.0, self.deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.kill_all()
            return False
        return rc == 0

    def kill_all(self) -> None:
        with self.lock:
            self.expired = True
            for p in self.procs:
                if p.poll() is None:
                    p.kill()


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


# what each step leaves last, atomically: a later device run on the same --work folder skips the step
DONE_MARKS = {"stage1": "stage1/medregion_config.json", "stage2": "stage2/medregion_config.json",
              "generate": "predictions.parquet"}


def _open_work(bundle: Path, work: Path) -> Path:
    """Extract the bundle into `work` (once); a folder holding another bundle's runs is refused."""
    from model.gguf_import import sha256_file  # imports neither zarr nor SimpleITK (absent on the device)

    digest, stamp = sha256_file(bundle), work / "bundle.sha256"
    if stamp.is_file():
        if stamp.read_text(encoding="utf-8").strip() != digest:
            raise SystemExit(f"{work}: holds the runs of another bundle than {bundle}; give a new --work folder")
        return work / "bundle"
    root = _extract(bundle, work) / "bundle"
    stamp.write_text(digest + "\n", encoding="utf-8")
    return root


def device(bundle: Path, out: Path, device_name: str, deadline_s: float, seeds: list[int] | None = None,
           work: Path | None = None, experiments: list[str] | None = None) -> dict:
    """Demo LM per seed, then all (seed, experiment) runs at once; `out/predictions.tar.gz` holds what
    finished (predictions, logs, train logs, timings) and `out/device_summary.json` the timings.

    Run again on the same `work` folder, it resumes: a demo LM, stage or prediction already there is
    reused (`DONE_MARKS`), and `experiments` restricts this run to some of the bundle's experiments."""
    t_start = time.time()
    deadline = t_start + deadline_s
    work = Path(work or tempfile.mkdtemp(prefix="gpu-ablation-device-"))
    work.mkdir(parents=True, exist_ok=True)
    root = _open_work(bundle, work)
    plan = json.loads((root / "plan.json").read_text(encoding="utf-8"))
    seeds = list(seeds if seeds is not None else plan["seeds"])
    names = list(experiments or plan["experiments"])
    unknown = [n for n in names if n not in plan["experiments"]]
    if unknown:
        raise SystemExit(f"{bundle}: no experiment {', '.join(unknown)}; it has {', '.join(plan['experiments'])}")
    stand_ins = write_stand_ins(work / "stand_ins")
    threads = max(1, (os.cpu_count() or 2) // max(1, len(seeds) * len(names)))
    llm_threads = max(1, (os.cpu_count() or 2) // max(1, len(seeds)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stand_ins), str(REPO)]),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if device_name == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    runs = _Runs(env, deadline)
    py = sys.executable
    feats = {p: sorted(str(s) for s in (root / "features" / p).glob("shard-*.zarr")) for p in ("r2", "lita")}
    attrs = sorted(str(p) for p in (root / "attributes").glob("shard-*.parquet"))
    reports = {s: str(root / "reports" / f"{s}.parquet") for s in ("train", "validation", "test")}
    runs_dir = work / "runs"
    runs_dir.mkdir(exist_ok=True)
    timings: dict[str, dict] = {}
    status: dict[str, str] = {}
    gpu = _gpu_name(device_name)
    _log(f"device {gpu}; {len(seeds)} seeds x {len(names)} experiments, {threads} CPU threads each; "
         f"deadline {deadline_s:.0f} s")

    def build_llm(seed: int) -> bool:
        llm = plan["llm"]
        out_dir = runs_dir / f"seed{seed}" / "llm"
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if (out_dir / "config.json").is_file():  # model.demo_llm renames the folder into place when complete
            timings[f"seed{seed}/demo_llm"] = {"reused": True}
            _log(f"seed {seed}: demo LM reused from {out_dir}")
            return True
        settings = {"demo_hidden_size": llm["hidden_size"], "demo_layers": llm["layers"],
                    "demo_vocab_size": llm["vocab_size"], "demo_seed": seed, "demo_pretrain_steps": llm["pretrain_steps"],
                    "demo_init_std": llm["init_std"], "demo_attribute_text": bool(llm["attribute_text"])}
        cmd = [py, "-m", "model.demo_llm", "--reports", reports["train"], "--out", str(out_dir),
               "--params-json", json.dumps(settings)]
        if llm["attribute_text"]:
            cmd += ["--attributes", *attrs]
        t = time.perf_counter()
        # the demo LM pre-trains on CPU (model.demo_llm), one build per seed at once: share the cores
        ok = runs.run(cmd, out_dir.parent / "demo_llm.log", {"OMP_NUM_THREADS": str(llm_threads),
                                                              "MKL_NUM_THREADS": str(llm_threads)})
        timings[f"seed{seed}/demo_llm"] = {"wall_s": round(time.perf_counter() - t, 1), "ok": ok}
        _log(f"seed {seed}: demo LM {'built' if ok else 'FAILED'} in {time.perf_counter() - t:.0f} s")
        return ok

    def one_run(seed: int, name: str) -> None:
        exp = plan["experiments"][name]
        d = runs_dir / f"seed{seed}" / name
        d.mkdir(parents=True, exist_ok=True)
        log = d / "run.log"
        llm = str(runs_dir / f"seed{seed}" / "llm")
        common = ["--features", *feats[exp["pooling"]], "--attributes", *attrs, "--train-reports", reports["train"],
                  "--val-reports", reports["validation"], "--llm", llm]
        p1 = {**plan["train"][name]["stage1"], "seed": seed}
        p2 = {**plan["train"][name]["stage2"], "seed": seed}
        steps = [
            # --resume: a stage cut off by the deadline continues from its latest checkpoint next time
            ("stage1", [py, "-m", "model.train", "--stage", "1", "--params-json", json.dumps(p1), *common,
                        "--out", str(d / "stage1"), "--resume", "--on-mismatch", "restart"]),
            ("stage2", [py, "-m", "model.train", "--stage", "2", "--params-json", json.dumps(p2), *common,
                        "--init", str(d / "stage1"), "--out", str(d / "stage2"), "--resume", "--on-mismatch",
                        "restart"]),
            ("generate", [py, "-m", "model.generate", "--model", str(d / "stage2"), "--features",
                          *feats[exp["pooling"]], "--attributes", *attrs, "--reports", reports["test"],
                          "--out", str(d / "predictions.parquet"),
                          "--params-json", json.dumps({"max_new_tokens": plan["generate"]["max_new_tokens"],
                                                       "batch_size": plan["generate"]["batch_size"]}),
                          "--device", device_name]),
        ]
        key = f"seed{seed}/{name}"
        timings[key] = {}
        for step, cmd in steps:
            if (d / DONE_MARKS[step]).exists():
                timings[key].setdefault("reused", []).append(step)
                continue
            t = time.perf_counter()
            ok = runs.run(cmd, log)
            timings[key][f"{step}_s"] = round(time.perf_counter() - t, 1)
            if not ok:
                status[key] = f"{step} {'stopped at the deadline' if runs.expired else 'failed'}"
                _log(f"{key}: {status[key]}\n{_tail(log)}")
                return
        status[key] = "done"
        _log(f"{key}: done ({', '.join(f'{k} {v:.0f} s' if k != 'reused' else f'reused {v}' for k, v in timings[key].items())})")

    llm_builds = [threading.Thread(target=lambda s=s: status.__setitem__(f"seed{s}/demo_llm", "done" if build_llm(s)
                                                                            else "failed")) for s in seeds]
    for t in llm_builds:
        t.start()
    for t in llm_builds:
        t.join()
    workers = [threading.Thread(target=one_run, args=(s, name)) for s in seeds for name in names
               if status.get(f"seed{s}/demo_llm") == "done"]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for s in seeds:  # the experiments left out of this run count as done where an earlier one finished them
        for name in plan["experiments"]:
            if name not in names:
                done_before = (runs_dir / f"seed{s}" / name / DONE_MARKS["generate"]).exists()
                status[f"seed{s}/{name}"] = "done" if done_before else "not run (--experiments)"
    wall = time.time() - t_start
    summary = {"device": gpu, "seeds": seeds, "experiments": list(plan["experiments"]), "wall_s": round(wall, 1),
               "deadline_s": deadline_s, "status": status, "timings": timings, "plan": plan}
    pack_predictions(runs_dir, out, summary)
    done = sum(v == "done" for k, v in status.items() if not k.endswith("demo_llm"))
    _log(f"{done} of {len(seeds) * len(plan['experiments'])} runs done in {wall:.0f} s on {gpu}; "
         f"{out / PREDICTIONS_FILE} ({(out / PREDICTIONS_FILE).stat().st_size / 2**20:.1f} MiB)")
    return summary


def pack_predictions(runs_dir: Path, out: Path, summary: dict) -> Path:
    """`out/predictions.tar.gz` (predictions, logs, train logs, the summary) and `out/device_summary.json`."""
    out.mkdir(parents=True, exist_ok=True)
    (runs_dir / "device_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp = out / f".{PREDICTIONS_FILE}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(runs_dir / "device_summary.json", arcname="device_summary.json")
        for seed_dir in sorted(runs_dir.glob("seed*")):
            for f in sorted(seed_dir.rglob("*")):
                keep = f.name in ("predictions.parquet", "run.log", "demo_llm.log", "train_log.jsonl",
                                  "medregion_config.json")
                if f.is_file() and keep:
                    tar.add(f, arcname=str(f.relative_to(runs_dir)))
    os.replace(tmp, out / PREDICTIONS_FILE)
    shutil.copy2(runs_dir / "device_summary.json", out / "device_summary.json")
    return out / PREDICTIONS_FILE


def collect(work: Path, out: Path) -> dict:
    """Pack what a device run (its `--work` folder) has finished so far, while the rest still runs: a run
    counts as done once its predictions.parquet exists (generation writes it atomically, last)."""
    plan_path, runs_dir = work / "bundle" / "plan.json", work / "runs"
    seeds = sorted(int(d.name.removeprefix("seed")) for d in runs_dir.glob("seed*") if d.is_dir())
    if not plan_path.is_file() or not seeds:
        missing = "bundle/plan.json" if not plan_path.is_file() else "runs/seed*"
        raise SystemExit(f"{work}: no {missing}: is it the --work folder of a device run?")
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    status = {f"seed{s}/{name}": "done" if (runs_dir / f"seed{s}" / name / "predictions.parquet").exists()
              else "not finished when collected" for s in seeds for name in plan["experiments"]}
    summary = {"device": "collected from a device run still going", "seeds": seeds,
               "experiments": list(plan["experiments"]), "wall_s": None, "deadline_s": None, "status": status,
               "timings": {}, "plan": plan}
    path = pack_predictions(runs_dir, out, summary)
    _log(f"collected {sum(v == 'done' for v in status.values())} of {len(status)} runs into {path}")
    return summary


def _gpu_name(device_name: str) -> str:
    if device_name == "cpu":
        return "cpu"
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device found)"
    except Exception as exc:  # noqa: BLE001  (the name is a label; its absence must not stop the run)
        return f"unknown ({exc})"


# ---- 3. score (CPU, here) -----------------------------------------------------------------------------

def read_predictions_table(path: Path) -> dict[str, dict[str, str]]:
    """The prediction table of benchmarks/ablation_predictions.md: {class: {experiment: "stay" | "fall"}}.
    Rows `| class | full | r2_mask | r2_attr | r2 | lita |` whose cells start with stay / fall / ref."""
    table: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) < 1 + len(EXPERIMENTS) or not line.lstrip().startswith("|"):
            header = None if not line.strip() else header
            continue
        if [c.lower() for c in cells[1:1 + len(EXPERIMENTS)]] == list(EXPERIMENTS):
            header = cells
            continue
        if header is None or set(cells[1]) <= set("-: "):
            continue
        row = {}
        for exp, cell in zip(EXPERIMENTS, cells[1:]):
            word = cell.split()[0].lower() if cell.split() else ""
            if word not in ("stay", "fall", "ref"):
                raise SystemExit(f"{path}: class {cells[0]!r}, experiment {exp}: cell {cell!r} is not stay / fall / ref")
            row[exp] = word
        table[cells[0]] = row
    if not table:
        raise SystemExit(f"{path}: no prediction table (| class | {' | '.join(EXPERIMENTS)} |)")
    return table


def paired_permutation_p(ref, hyp_a, hyp_b, classes_idx, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided paired permutation test over volumes of macro F1(a) - macro F1(b) over `classes_idx`:
    each permutation swaps a volume's two label vectors with probability 1/2."""
    import numpy as np

    ref = np.asarray(ref)[:, classes_idx].astype(bool)
    a = np.asarray(hyp_a)[:, classes_idx].astype(bool)
    b = np.asarray(hyp_b)[:, classes_idx].astype(bool)
    rng = np.random.default_rng(seed)

    def macro(h):  # h: (perm, volumes, classes)
        tp = (h & ref).sum(-2)
        fp = (h & ~ref).sum(-2)
        fn = (~h & ref).sum(-2)
        return (2 * tp / np.maximum(1, 2 * tp + fp + fn)).mean(-1)

    observed = abs(macro(a[None]) - macro(b[None]))[0]
    swap = rng.random((n_perm, a.shape[0], 1)) < 0.5
    pa, pb = np.where(swap, b[None], a[None]), np.where(swap, a[None], b[None])
    diffs = np.abs(macro(pa) - macro(pb))
    return float((1 + (diffs >= observed - 1e-12).sum()) / (1 + n_perm))


# table column -> the evaluate stage's metric name (merged report against the findings): corpus BLEU-4,
# the METEOR 1.5 jar's corpus score, ROUGE-L F (beta 1.2) per-report mean; implementations in metrics.json
NLG_COLUMNS = {"bleu_4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L"}


def _nlg_value(metrics: dict, name: str) -> float | None:
    entry = metrics.get("nlg", {}).get("report", {}).get(name, {})
    return entry.get("value") if isinstance(entry, dict) else None


def score(bundle: Path, predictions: Path, out_json: Path, predictions_md: Path, java: str | None = None) -> dict:
    """Per seed and experiment: CA-F1 per planted class and macro (the rule labeler, as the evaluate stage),
    BLEU-4 / METEOR / ROUGE-L from the evaluate stage's CLI, the paired permutation p of each ablation against
    `full`; then mean and spread over seeds, and each prediction of the markdown table held or not."""
    import numpy as np
    import pandas as pd

    from pipeline.constants import CTRATE_CLASSES
    from pipeline.evaluate.clinical import clinical_scores
    from pipeline.evaluate.labeler import label_reports
    from pipeline.io import write_json

    sys.path.insert(0, str(REPO / "benchmarks"))
    from demo_learning import PLANTED

    expected = read_predictions_table(predictions_md)
    with tempfile.TemporaryDirectory(prefix="gpu-ablation-score-") as tmp:
        tmp = Path(tmp)
        root = _extract(bundle, tmp / "b") / "bundle"
        runs = _extract(predictions, tmp / "p")
        summary = json.loads((runs / "device_summary.json").read_text(encoding="utf-8"))
        test = pd.read_parquet(root / "reports" / "test.parquet").set_index("volume_id")
        ref_all = label_reports(test["findings"].tolist())
        per_run: dict[str, dict] = {}
        labels: dict[tuple[int, str], np.ndarray] = {}
        for seed in summary["seeds"]:
            for exp in summary["experiments"]:
                pred_path = runs / f"seed{seed}" / exp / "predictions.parquet"
                if not pred_path.exists():
                    per_run[f"seed{seed}/{exp}"] = {"status": summary["status"].get(f"seed{seed}/{exp}", "missing")}
                    continue
                pred = pd.read_parquet(pred_path).set_index("volume_id").reindex(test.index)
                hyp = label_reports(pred["report"].fillna("").tolist())
                labels[(seed, exp)] = hyp
                cs = clinical_scores(ref_all, hyp)
                used = [c for c in PLANTED if cs["per_class"][c]["f1"] is not None]
                metrics_path = tmp / f"seed{seed}-{exp}-metrics.json"
                cmd = [sys.executable, "-m", "pipeline.evaluate", "--predictions", str(pred_path), "--references",
                       str(root / "reports" / "test.parquet"), "--experiment", exp, "--out", str(metrics_path)]
                if java:
                    cmd += ["--java", java]
                proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", cwd=REPO)
                if proc.returncode != 0:
                    raise SystemExit(f"evaluate failed for {pred_path}:\n{proc.stderr[-2000:]}")
                metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
                per_run[f"seed{seed}/{exp}"] = {
                    "status": "done",
                    "ca_f1_macro_planted": float(np.mean([cs["per_class"][c]["f1"] for c in used])) if used else None,
                    "per_class_f1": {c: cs["per_class"][c]["f1"] for c in used},
                    **{key: _nlg_value(metrics, name) for key, name in NLG_COLUMNS.items()},
                }
    planted_idx = [CTRATE_CLASSES.index(c) for c in PLANTED]
    used_idx = [i for i in planted_idx if ref_all[:, i].any()]
    for (seed, exp), hyp in labels.items():
        if exp != "full" and (seed, "full") in labels:
            per_run[f"seed{seed}/{exp}"]["paired_p_vs_full"] = paired_permutation_p(
                ref_all, labels[(seed, "full")], hyp, used_idx)

    def stats(values):
        v = [x for x in values if x is not None]
        return {"mean": float(np.mean(v)) if v else None, "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                "n": len(v)}

    table: dict[str, dict] = {}
    for exp in summary["experiments"]:
        rows = [per_run.get(f"seed{s}/{exp}", {}) for s in summary["seeds"]]
        rows = [r for r in rows if r.get("status") == "done"]
        classes = sorted({c for r in rows for c in r["per_class_f1"]}, key=PLANTED.index)
        table[exp] = {"ca_f1_macro_planted": stats([r["ca_f1_macro_planted"] for r in rows]),
                      "per_class_f1": {c: stats([r["per_class_f1"].get(c) for r in rows]) for c in classes},
                      **{m: stats([r[m] for r in rows]) for m in ("bleu_4", "meteor", "rouge_l")},
                      "paired_p_vs_full": [r.get("paired_p_vs_full") for r in rows]}
    verdicts = {}
    for cls, row in expected.items():
        full = table.get("full", {}).get("per_class_f1", {}).get(cls, {}).get("mean")
        for exp, want in row.items():
            got = table.get(exp, {}).get("per_class_f1", {}).get(cls, {}).get("mean")
            if want == "ref" or full is None or got is None:
                continue
            drop = full - got
            # a fall of FALL cannot be seen below a full F1 of FALL: the prediction's premise (full learns
            # the class) failed, which is reported as untestable, not as a miss
            held = None if want == "fall" and full < FALL else drop >= FALL if want == "fall" else abs(drop) <= STAY
            verdicts[f"{cls} / {exp}"] = {"predicted": want, "full": round(full, 3), "ablation": round(got, 3),
                                          "drop": round(drop, 3), "held": held}
    result = {"device": summary["device"], "device_wall_s": summary["wall_s"], "seeds": summary["seeds"],
              "status": summary["status"], "timings": summary["timings"], "cohort": summary["plan"]["cohort"],
              "table": table, "runs": per_run, "predictions": verdicts,
              "thresholds": {"fall_by_at_least": FALL, "stay_within": STAY},
              "nlg_metrics": {k: f"evaluate stage {v} (merged report vs findings)" for k, v in NLG_COLUMNS.items()},
              "significance": "paired permutation test over test volumes of macro CA-F1 (planted classes), 2000 "
                              "permutations, per seed"}
    write_json(result, out_json)
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    def cell(s):
        if not s or s.get("mean") is None:
            return "-"
        return f"{s['mean']:.3f}" + (f" ± {s['sd']:.3f}" if s.get("sd") is not None else "")

    lines = [f"ablation on {result['device']} ({len(result['seeds'])} model seeds; mean ± sd)",
             "| experiment | CA-F1 (planted) | BLEU-4 | METEOR | ROUGE-L | p vs full (per seed) |",
             "|---|---|---|---|---|---|"]
    for exp, row in result["table"].items():
        ps = ", ".join("-" if p is None else f"{p:.3f}" for p in row["paired_p_vs_full"]) if exp != "full" else ""
        lines.append(f"| {exp} | {cell(row['ca_f1_macro_planted'])} | {cell(row['bleu_4'])} | {cell(row['meteor'])} "
                     f"| {cell(row['rouge_l'])} | {ps} |")
    classes = sorted({c for row in result["table"].values() for c in row["per_class_f1"]})
    lines += ["", "| class | " + " | ".join(result["table"]) + " |", "|---" * (1 + len(result["table"])) + "|"]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(cell(row["per_class_f1"].get(c)) for row in result["table"].values()) + " |")
    held = [v["held"] for v in result["predictions"].values()]
    lines += ["", f"predictions held: {held.count(True)} of {len(held)}; not held: {held.count(False)}; "
                  f"untestable (full F1 below {FALL}, so no fall of {FALL} can show): {held.count(None)}"]
    lines += [f"  NOT held: {k}: predicted {v['predicted']}, full {v['full']}, ablation {v['ablation']}"
              for k, v in result["predictions"].items() if v["held"] is False]
    return "\n".join(lines)


# ---- CLI ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="all three steps on CPU: 20 volumes, one epoch, --device cpu")
    ap.add_argument("--keep", type=Path, help="--tiny: work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="--tiny: model seeds (default 0)")
    sub = ap.add_subparsers(dest="step")
    p = sub.add_parser("prepare", help="CPU: data stages through the workflow, then the bundle")
    p.add_argument("--workdir", type=Path, required=True, help="the workflow's working directory (results/ inside)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--configfile", nargs="+", default=list(KNOWN_ANSWER_CONFIGS),
                   help="config files, later ones overriding earlier ones (default: the known-answer set)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="model seeds (default: 0 1 2)")
    p.add_argument("--max-mib", type=float, default=DEVICE_LIMIT_MIB - 4.0,
                   help="refuse a bundle larger than this (the device tool carries 64 MiB with the repository)")
    k = sub.add_parser("pack", help="CPU: only the bundle, from a workdir whose data stages have run")
    k.add_argument("--workdir", type=Path, required=True)
    k.add_argument("--bundle", type=Path, required=True)
    k.add_argument("--configfile", nargs="+", default=list(KNOWN_ANSWER_CONFIGS))
    k.add_argument("--max-mib", type=float, default=DEVICE_LIMIT_MIB - 4.0)
    k.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="model seeds (default: 0 1 2)")
    d = sub.add_parser("device", help="GPU machine: models for every seed and experiment, concurrently")
    d.add_argument("--bundle", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True, help="where predictions.tar.gz and device_summary.json go")
    d.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    d.add_argument("--deadline-s", type=float, default=480.0,
                   help="stop every run still going after this many seconds and pack what finished")
    d.add_argument("--work", type=Path, default=None,
                   help="working folder (default: a new temporary one); an earlier run's folder resumes it")
    d.add_argument("--experiments", nargs="+", default=None,
                   help="only these of the bundle's experiments (default: all)")
    d.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="model seeds (default: the bundle's, 0 1 2)")
    c = sub.add_parser("collect", help="pack what a device run has finished so far (its --work folder)")
    c.add_argument("--work", type=Path, required=True, help="the --work folder of a device run")
    c.add_argument("--out", type=Path, required=True, help="where predictions.tar.gz and device_summary.json go")
    s = sub.add_parser("score", help="CPU: metrics, paired tests, the table against the predictions")
    s.add_argument("--bundle", type=Path, required=True)
    s.add_argument("--predictions", type=Path, required=True, help="predictions.tar.gz from the device step")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--expected", type=Path, default=REPO / "benchmarks" / "ablation_predictions.md")
    s.add_argument("--java", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        if args.step:
            ap.error("--tiny runs all three steps itself: give no step")
        return tiny(args.keep, args.seeds or [0])
    if args.step == "prepare":
        prepare(args.workdir, args.bundle, args.configfile, args.seeds or [0, 1, 2], args.cores, args.max_mib)
    elif args.step == "pack":
        pack_bundle(args.workdir, args.bundle, args.configfile, args.seeds or [0, 1, 2], args.max_mib)
    elif args.step == "device":
        summary = device(args.bundle, args.out, args.device, args.deadline_s, args.seeds, args.work,
                         args.experiments)
        return 0 if all(v == "done" for v in summary["status"].values()) else 1
    elif args.step == "collect":
        collect(args.work, args.out)
    elif args.step == "score":
        score(args.bundle, args.predictions, args.out, args.expected, args.java)
    else:
        ap.error("give a step (prepare, pack, device, collect, score) or --tiny")
    return 0


def tiny(keep: Path | None, seeds: list[int]) -> int:
    """The three steps on CPU in one folder: what the CI test runs."""
    work = keep or Path(tempfile.mkdtemp(prefix="gpu-ablation-tiny-"))
    t0 = time.perf_counter()
    try:
        prep = prepare(work / "data", work / "bundle.tar.gz", list(TINY_CONFIGS), seeds, cores=2)
        summary = device(work / "bundle.tar.gz", work / "out", "cpu", deadline_s=1800, work=work / "device")
        score(work / "bundle.tar.gz", work / "out" / PREDICTIONS_FILE, work / "ablation.json",
              REPO / "benchmarks" / "ablation_predictions.md")
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    _log(f"tiny run: {time.perf_counter() - t0:.0f} s (bundle {prep['bundle_mib']} MiB)")
    return 0 if all(v == "done" for v in summary["status"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
