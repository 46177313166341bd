"""The trainer as a lab would run it: launch command from config, 2 gloo processes = 1 process, resume
after SIGKILL, save/load keeps the generated text, bad input, the benchmark scripts' CPU modes.

Uses the tiny fixture of tests/conftest.py (tiny Llama, C = 16 feature shard, 8 train volumes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import E2E_CONFIG, REPO, C, log_records, make_dataset, make_model, run_cli, run_process_group, snakemake, train_args

from model.data import Collator, ReportDataset, build_dataset
from model.launch import build_launch, gpus_per_machine
from model.network import MedRegionCT
from model.prompt import IMG_TOKEN, MASK_TOKEN, POS_TOKEN
from model.prompt import parse_structured as parse
from pipeline.feature_store import FeatureStore, write_feature_shard

CPU_CFG = REPO / "config" / "accelerate" / "cpu.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

# dropout off, so that the runs are comparable step by step
EXACT = {
    "batch_size": 2,
    "grad_accum": 1,
    "lr": 1e-2,
    "warmup_ratio": 0.1,
    "mask_hidden": 24,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "log_every": 1,
    "checkpoint_every": 0,
}


@pytest.fixture(scope="module")
def stage1(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1") / "stage1"
    params = {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "log_every": 1, "checkpoint_every": 0}
    run_cli("model.train", *train_args(tiny, 1, out, params))
    return out


def trainable_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    w = dict(load_file(str(out / "connector_mask.safetensors")))
    w.update({f"lora/{k}": v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()})
    return w


# ---- launch command --------------------------------------------------------------------------------


def test_launch_command_from_config(tmp_path):
    args = ["--stage", "1", "--out", "x"]
    one = build_launch(CPU_CFG, args, processes=1, environ={})
    assert one.launcher == "accelerate"
    assert one.argv[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert one.argv[one.argv.index("--num_processes") + 1] == "1"
    assert one.argv[-5:] == ["model.train", *args]
    two = build_launch(CPU_CFG, args, processes=2, environ={})
    assert two.launcher == "torchrun" and two.env == {"ACCELERATE_USE_CPU": "true"}
    assert "torch.distributed.run" in two.argv and "--standalone" in two.argv
    assert two.argv[two.argv.index("--nproc_per_node") + 1] == "2"
    # GPU configs always go through accelerate launch, with the process / machine counts given
    ds = build_launch(REPO / "config/accelerate/deepspeed_zero2.yaml", args, processes=8, machines=2,
                      environ={"SLURM_NODEID": "1", "MASTER_ADDR": "node01"})
    assert ds.launcher == "accelerate"
    for flag, value in (("--num_processes", "8"), ("--num_machines", "2"), ("--machine_rank", "1"),
                        ("--main_process_ip", "node01"), ("--main_process_port", "29500")):
        assert ds.argv[ds.argv.index(flag) + 1] == value
    assert build_launch(REPO / "config/accelerate/ddp.yaml", args, environ={}).argv[
        build_launch(REPO / "config/accelerate/ddp.yaml", args, environ={}).argv.index("--num_processes") + 1
    ] == "4"  # the file's own count when none is given
    with pytest.raises(ValueError, match="machine-rank"):
        build_launch(REPO / "config/accelerate/ddp.yaml", args, machines=2, environ={"MASTER_ADDR": "h"})
    proc = subprocess.run([sys.executable, "-m", "model.launch", "--accelerate-config", str(CPU_CFG),
                           "--processes", "2", "--dry-run", "--", "--stage", "2"],
                          cwd=REPO, env=ENV, capture_output=True, encoding="utf-8", errors="replace", check=True)
    assert "torch.distributed.run" in proc.stdout and "ACCELERATE_USE_CPU=true" in proc.stdout


def test_train_gpus_follow_the_process_count():
    acc = REPO / "config" / "accelerate"
    assert gpus_per_machine(CPU_CFG, processes=2) == 0  # CPU ranks need no GPU
    assert gpus_per_machine(acc / "single_gpu.yaml") == 1
    assert gpus_per_machine(acc / "ddp.yaml") == 4  # the file's num_processes
    assert gpus_per_machine(acc / "ddp.yaml", processes=8) == 8
    assert gpus_per_machine(acc / "deepspeed_zero2.yaml", processes=16, machines=2) == 8  # per node
    with pytest.raises(ValueError, match="split evenly"):
        gpus_per_machine(acc / "ddp.yaml", processes=3, machines=2)


@pytest.mark.parametrize(("accelerate", "processes", "gpus"), [("ddp", 4, 4), ("cpu", 2, 0)])
def test_train_jobs_request_their_gpus(tmp_path, accelerate, processes, gpus):
    """The train rules' `gpu` resource (what the SLURM profile turns into --gpus) is the GPUs that
    `train.processes` will start processes on, not a fixed number in the profile."""
    overlay = tmp_path / "train.yaml"
    overlay.write_text(f"train:\n  accelerate_config: config/accelerate/{accelerate}.yaml\n"
                       f"  processes: {processes}\n", encoding="utf-8")
    proc = snakemake(tmp_path, "-n", "results/experiments/full/stage2/medregion_config.json", timeout=300,
                     configfiles=(E2E_CONFIG, overlay))
    out = proc.stdout + proc.stderr
    for stage in ("train_stage1", "train_stage2"):
        block = out.split(f"rule {stage}:")[1].split("Shell command")[0]
        resources = block.split("resources:")[1].splitlines()[0]
        assert f"gpu={gpus}" in resources, resources


def test_train_rule_uses_the_launcher():
    text = (REPO / "workflow" / "rules" / "train.smk").read_text(encoding="utf-8")
    assert text.count("python -m model.launch {params.launch} --") == 2
    assert "accelerate launch" not in text.split("rule train_stage1")[1]


# ---- distributed: 2 gloo processes == 1 process with the same global batch ---------------------


def launch_train(tiny, out, params, processes, init):
    """Start model.train exactly as the rule does: python -m model.launch <flags> -- <trainer args>."""
    cmd = [sys.executable, "-m", "model.launch", "--accelerate-config", str(CPU_CFG),
           "--processes", str(processes), "--",
           *map(str, train_args(tiny, 2, out, params, "--init", init))]
    proc = run_process_group(cmd, ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return log_records(out)


def test_two_processes_match_one_process(tiny, stage1, tmp_path):
    """Global batch 4 per optimizer step both ways: 2 ranks x batch 2, or 1 process x batch 2 x accum 2.

    Tolerance: losses agree to 1e-5 (relative) and the final trainable weights to 1e-4 (absolute);
    the only difference is the order of fp32 additions (gloo all-reduce vs accumulation). Selection by
    validation clinical F1 is on: the two ranks generate half the validation reports each and must
    score what one process scores.
    """
    params = {**EXACT, "epochs": 2, "select_by": "val_ca_f1", "select_max_new_tokens": 24}
    two = launch_train(tiny, tmp_path / "two", params, 2, stage1)
    one = launch_train(tiny, tmp_path / "one", {**params, "grad_accum": 2}, 1, stage1)
    start2, start1 = two[0], one[0]
    assert start2["num_processes"] == 2 and start1["num_processes"] == 1
    pids = {r["pid"] for r in start2["ranks"]}
    assert sorted(r["rank"] for r in start2["ranks"]) == [0, 1] and len(pids) == 2  # two real processes
    assert start2["total_steps"] == start1["total_steps"] == 4
    l2 = [r["loss"] for r in two if "loss" in r]
    l1 = [r["loss"] for r in one if "loss" in r]
    assert len(l2) == len(l1) == 4
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    v2 = [r["val_loss"] for r in two if "val_loss" in r]
    v1 = [r["val_loss"] for r in one if "val_loss" in r]
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    f2 = [r["val_ca_f1"] for r in two if "val_ca_f1" in r and "event" not in r]
    f1 = [r["val_ca_f1"] for r in one if "val_ca_f1" in r and "event" not in r]
    assert len(f2) == 2 and f2 == f1 and None not in f1
    w2, w1 = trainable_weights(tmp_path / "two"), trainable_weights(tmp_path / "one")
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4, msg=k)


# ---- resume after SIGKILL -------------------------------------------------------------------------


def test_resume_after_sigkill_matches_uninterrupted(tiny, stage1, tmp_path):
    """Killed (SIGKILL, no clean-up) after its second checkpoint, restarted with --resume: same final
    weights (bit-identical, tolerance 0) and the same loss curve (exactly equal) as one uninterrupted run.
    Selection by validation clinical F1 is on and the kill comes after the first scored epoch (step 4),
    so the resumed run must carry on with the best weights kept before the kill."""
    params = {**EXACT, "lora_dropout": 0.1, "epochs": 8, "checkpoint_every": 3,  # dropout on: RNG state too
              "select_by": "val_ca_f1", "select_max_new_tokens": 24}
    ref = tmp_path / "ref"
    run_cli("model.train", *train_args(tiny, 2, ref, params, "--init", stage1))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "model.train", *map(str, train_args(tiny, 2, out, params, "--init", stage1))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "checkpoints" / "step-6" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert first.exists() and not (out / "medregion_config.json").exists()
    killed_at = max(r["step"] for r in log_records(out) if "loss" in r)

    run_cli("model.train", *train_args(tiny, 2, out, params, "--init", stage1, "--resume"))
    recs, ref_recs = log_records(out), log_records(ref)
    resumed = [r for r in recs if r.get("event") == "resume"]
    assert len(resumed) == 1 and 6 <= resumed[0]["step"] <= killed_at
    assert [(r["step"], r["loss"]) for r in recs if "loss" in r] == [
        (r["step"], r["loss"]) for r in ref_recs if "loss" in r
    ]
    assert [r["val_loss"] for r in recs if "val_loss" in r] == [r["val_loss"] for r in ref_recs if "val_loss" in r]
    assert [r.get("val_ca_f1") for r in recs if "val_loss" in r] == [
        r.get("val_ca_f1") for r in ref_recs if "val_loss" in r]
    chosen = [r for r in recs if r.get("event") == "selected"]
    assert chosen == [r for r in ref_recs if r.get("event") == "selected"] and chosen[0]["val_ca_f1"] is not None
    a, b = trainable_weights(ref), trainable_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_checkpoint_of_another_experiment_is_refused(tiny, stage1, tmp_path):
    out = tmp_path / "run"
    params = {**EXACT, "epochs": 2, "checkpoint_every": 1, "stop_after_steps": 2}
    run_cli("model.train", *train_args(tiny, 2, out, params, "--init", stage1))
    assert (out / "checkpoints" / "step-2").is_dir()
    changed = {**params, "lr": 5e-3, "stop_after_steps": None}
    proc = run_cli("model.train", *train_args(tiny, 2, out, changed, "--init", stage1, "--resume"), check=False)
    assert proc.returncode != 0
    assert "different experiment config" in proc.stderr and "params.lr" in proc.stderr
    assert not (out / "medregion_config.json").exists() and (out / "checkpoints" / "step-2").is_dir()
    # runtime-only parameters may change on resume
    ok = {**params, "log_every": 2, "stop_after_steps": None}
    run_cli("model.train", *train_args(tiny, 2, out, ok, "--init", stage1, "--resume"))
    assert [r["event"] for r in log_records(out) if "event" in r] == ["start", "stopped", "resume", "done"]
    # what the rule does after a config change: set the old checkpoints aside and start over
    out2 = tmp_path / "run2"
    run_cli("model.train", *train_args(tiny, 2, out2, params, "--init", stage1))
    proc = run_cli("model.train", *train_args(tiny, 2, out2, changed, "--init", stage1, "--resume",
                                              "--on-mismatch", "restart"))
    recs = log_records(out2)
    assert recs[0]["event"] == "start" and recs[0]["params"]["lr"] == 5e-3 and recs[-1]["event"] == "done"
    assert "different experiment config" in proc.stdout + proc.stderr
    # a stage-1 folder of another experiment is not used to start stage 2
    mlp = {**params, "connector": "mlp", "stop_after_steps": None}
    proc = run_cli("model.train", *train_args(tiny, 2, tmp_path / "run3", mlp, "--init", stage1), check=False)
    assert proc.returncode != 0 and "--init" in proc.stderr and "connector: 'linear' -> 'mlp'" in proc.stderr


# ---- save / from_pretrained keeps the generated text ---------------------------------------------


def test_from_pretrained_generates_the_same_text(tiny, tmp_path):
    model = make_model(tiny, stage=2)
    ds = make_dataset(tiny, model)
    col = Collator(model.tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(6):  # move every trainable tensor away from its initial value
        model(**col([ds[(2 * i) % len(ds)], ds[(2 * i + 1) % len(ds)]])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    val = make_dataset(tiny, model, reports="val.parquet", with_targets=False)
    left = Collator(model.tokenizer.pad_token_id, padding_side="left")
    batch = left([val[i] for i in range(len(val))])
    before = model.generate(batch, max_new_tokens=24)
    model.save_pretrained(tmp_path / "m")
    loaded = MedRegionCT.from_pretrained(tmp_path / "m")
    after = loaded.generate(batch, max_new_tokens=24)
    assert after == before and any(t for t in before)
    beams = loaded.generate(batch, max_new_tokens=8, num_beams=2)
    torch.manual_seed(0)
    s1 = loaded.generate(batch, max_new_tokens=8, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    assert loaded.generate(batch, max_new_tokens=8, do_sample=True, temperature=1.5) == s1
    assert len(beams) == len(s1) == len(val)


# ---- bad input ------------------------------------------------------------------------------------


def _shard_without_effusion(tiny, path):
    store = FeatureStore([tiny / "shard-0.zarr"])
    ids = store.volume_ids
    arrays = {k: np.stack([store[v][k] for v in ids]) for k in store[ids[0]]}
    arrays["mask_pooled"] = arrays["mask_pooled"][:, :8]
    arrays["mask_grid"] = arrays["mask_grid"][:, :8]
    arrays["mask_present"] = arrays["mask_present"][:, :8]
    write_feature_shard(path, ids, arrays, {"hidden_size": C, "encoder": "test"})
    return FeatureStore([path])


def test_cache_lacking_a_mask_names_the_volume(tiny, tmp_path):
    model = make_model(tiny)
    store = _shard_without_effusion(tiny, tmp_path / "shard-0.zarr")
    ds = ReportDataset(store, pd.read_parquet(tiny / "train.parquet"), pd.read_parquet(tiny / "attributes.parquet"),
                       model.tokenizer, stage=2, use_mask_tokens=True, use_attributes=True)
    with pytest.raises(ValueError, match=r"volume vol000: the feature cache holds 8 mask_pooled"):
        ds[0]
    # a cache that says which masks it has is refused when the dataset is built
    store.attrs["masks"] = ["lung", "airways", "mediastinum", "heart", "osseous", "abdomen", "nodule", "cyst"]
    with pytest.raises(ValueError, match=r"volume vol000 .*lacking \['effusion'\]"):
        ReportDataset(store, pd.read_parquet(tiny / "train.parquet"), pd.read_parquet(tiny / "attributes.parquet"),
                      model.tokenizer, stage=2, use_mask_tokens=True, use_attributes=True)
    # without mask tokens (ablation) the same cache is fine
    ok = ReportDataset(store, pd.read_parquet(tiny / "train.parquet"), pd.read_parquet(tiny / "attributes.parquet"),
                       model.tokenizer, stage=2, use_mask_tokens=False, use_attributes=True)
    assert "mask_pooled" not in ok[0]


def test_long_report_truncated_at_target_end_and_counted(tiny, tmp_path):
    model = make_model(tiny)
    rep = pd.read_parquet(tiny / "train.parquet")
    rep.loc[2, "lung"] = " ".join(["A nodule in the right upper lobe."] * 400)
    rep.to_parquet(tmp_path / "long.parquet")
    full = make_dataset(tiny, model)
    ds = make_dataset(tiny, model, reports=tmp_path / "long.parquet", max_length=1000)
    assert ds.n_truncated == 1 and ds.truncated_ids == ["vol002"]
    item = ds[2]
    assert len(item["input_ids"]) == 1000 and item["input_ids"][-1] != model.tokenizer.eos_token_id
    # the target's beginning is kept, its end cut off
    p = ds.prompt_lengths[2]
    head = model.tokenizer.decode(item["input_ids"][p:p + 12])
    assert head.startswith("[Lung]: A nodule")
    assert all(len(ds[i]["input_ids"]) == len(full[i]["input_ids"]) for i in (0, 1, 3))
    # and the trainer runs on it, counting it in the log
    out = tmp_path / "run"
    args = train_args(tiny, 2, out, {**EXACT, "epochs": 1, "max_length": 1000})
    args[args.index("--train-reports") + 1] = tmp_path / "long.parquet"
    run_cli("model.train", *args)
    start = log_records(out)[0]
    assert start["truncated_targets"] == 1 and start["truncated_volumes"] == ["vol002"]


def test_empty_target_is_left_out_and_counted(tiny, tmp_path):
    model1 = make_model(tiny, stage=1)
    rep = pd.read_parquet(tiny / "train.parquet")
    rep.loc[1, "findings"] = "   "
    rep.loc[4, "findings"] = None
    rep.to_parquet(tmp_path / "empty.parquet")
    ds = make_dataset(tiny, model1, reports=tmp_path / "empty.parquet")
    assert ds.n_empty_targets == 2 and ds.empty_target_ids == ["vol001", "vol004"]
    assert "vol001" not in ds.volume_ids and len(ds) == len(rep) - 2
    # stage 2: empty only when all six region texts are empty
    model2 = make_model(tiny, stage=2)
    rep2 = pd.read_parquet(tiny / "train.parquet")
    for r in ("lung", "airways", "mediastinum", "heart", "osseous", "abdomen"):
        rep2.loc[3, r] = ""
    rep2.loc[5, "lung"] = ""
    rep2.to_parquet(tmp_path / "empty2.parquet")
    ds2 = make_dataset(tiny, model2, reports=tmp_path / "empty2.parquet")
    assert ds2.empty_target_ids == ["vol003"]
    # every target empty: a clear error, not a silent empty run
    rep.loc[:, "findings"] = ""
    rep.to_parquet(tmp_path / "all_empty.parquet")
    with pytest.raises(ValueError, match="empty stage-1 target"):
        make_dataset(tiny, model1, reports=tmp_path / "all_empty.parquet")
    # the trainer logs the count
    out = tmp_path / "run"
    args = train_args(tiny, 1, out, {"epochs": 1, "batch_size": 2, "log_every": 1, "checkpoint_every": 0})
    args[args.index("--train-reports") + 1] = tmp_path / "empty.parquet"
    run_cli("model.train", *args)
    assert log_records(out)[0]["empty_targets_dropped"] == 2


def test_tokenizer_without_placeholders_added_once_resized_saved(tiny, tmp_path):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(str(tiny / "llm"))
    assert not any(t in base.get_vocab() for t in (IMG_TOKEN, MASK_TOKEN, POS_TOKEN))
    model = make_model(tiny, stage=2)
    tok = model.tokenizer
    assert len(tok) == len(base) + 3
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    assert torch.count_nonzero(emb[len(base):]) == 0
    # building a second network on the same tokenizer adds nothing
    again = MedRegionCT(model.config, make_model(tiny, stage=1).llm, tok)
    assert len(again.tokenizer) == len(base) + 3
    assert again.img_token_id == model.img_token_id
    # the base LM folder is untouched; the saved model carries the extended tokenizer
    model.save_pretrained(tmp_path / "m")
    assert len(AutoTokenizer.from_pretrained(str(tiny / "llm"))) == len(base)
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "m" / "tokenizer"))
    assert saved.convert_tokens_to_ids([IMG_TOKEN, MASK_TOKEN, POS_TOKEN]) == [
        model.img_token_id, model.mask_token_id, model.pos_token_id]
    loaded = MedRegionCT.from_pretrained(tmp_path / "m")
    assert loaded.llm.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok(f"x{IMG_TOKEN}{IMG_TOKEN}y", add_special_tokens=False)["input_ids"]
    assert ids.count(model.img_token_id) == 2  # one id per placeholder, never split


# ---- it learns (on features that carry the finding) -----------------------------------------------


LUNG = ["The lungs are clear.", "A nodule in the right upper lobe.", "Emphysema in both lungs."]


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """60 volumes whose cached features carry the lung finding (class = i % 3, five channels raised by
    two standard deviations); identical attribute text for all, so only the image tells them apart. Short
    vision (4 + 12 tokens) to keep it fast; the LM is pre-trained on the training reports first, as the
    demo LM is, so stage 2 only has to learn the conditioning."""
    from model.demo_llm import build_demo_llm
    from model.prompt import format_structured
    from pipeline.constants import REGIONS

    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    n, c = 60, 16
    ids = [f"v{i:03d}" for i in range(n)]
    cls = np.arange(n) % 3
    # class k raises channels 5k..5k+4 by 2: a direction per class (the LM's RMSNorm would hide a
    # class coded by magnitude alone)
    shift = np.zeros((n, 1, c))
    for i, k in enumerate(cls):
        shift[i, 0, 5 * k : 5 * k + 5] = 2.0
    arrays = {
        "global": rng.normal(0, 1, (n, 4, c)) + shift,
        "region": rng.normal(0, 1, (n, 12, c)) + shift,
        "mask_pooled": rng.normal(0, 1, (n, 9, 2, c)) + shift[:, :, None],
        "mask_grid": rng.random((n, 9, 2, 4, 4)) > 0.5,
        "region_slices": np.tile(np.arange(6), (n, 1)),
        "mask_present": np.ones((n, 9), bool),
    }
    write_feature_shard(root / "shard-0.zarr", ids, arrays, {"hidden_size": c, "encoder": "test"})
    fixed = {"airways": "Trachea and main bronchi are patent.", "mediastinum": "No lymphadenopathy.",
             "heart": "Heart size is normal.", "osseous": "No lytic lesion.", "abdomen": "Liver is normal."}
    rows = [{"volume_id": v, "lung": LUNG[k], **fixed} for v, k in zip(ids, cls)]
    for r in rows:
        r["findings"] = " ".join(r[k] for k in REGIONS)
    df = pd.DataFrame(rows)
    df.iloc[:48].to_parquet(root / "train.parquet")
    df.iloc[48:].to_parquet(root / "val.parquet")
    pd.DataFrame({"volume_id": ids, "prompt": ["Organ Volumes: none"] * n}).to_parquet(root / "attributes.parquet")
    build_demo_llm(root / "llm", [format_structured(r) for r in rows[:48]], vocab_size=300, hidden_size=32,
                   layers=2, heads=4, pretrain_steps=100, pretrain_lr=1e-2, pretrain_batch=8)
    return root


def test_generated_reports_follow_the_features(learnable, tmp_path):
    """After stage 2, each held-out volume's generated lung section is the one of its class (three
    different texts for three classes). Fails if the splice, the connector, the mask tokens or the
    generation ignore the image: the prompts are otherwise identical."""
    root = learnable
    out = tmp_path / "learn"
    params = {**EXACT, "epochs": 30, "batch_size": 8, "lr": 1e-2, "use_attributes": False, "log_every": 5}
    args = ["--stage", "2", "--params-json", json.dumps(params), "--features", root / "shard-0.zarr",
            "--attributes", root / "attributes.parquet", "--train-reports", root / "train.parquet",
            "--val-reports", root / "val.parquet", "--llm", root / "llm", "--out", out]
    run_cli("model.train", *args)
    model = MedRegionCT.from_pretrained(out)
    ds = build_dataset([root / "shard-0.zarr"], [root / "attributes.parquet"], root / "val.parquet",
                       model.tokenizer, stage=2, use_mask_tokens=True, use_attributes=False,
                       n_vision=model.config.n_vision, with_targets=False)
    texts = model.generate(Collator(model.tokenizer.pad_token_id, "left")([ds[i] for i in range(len(ds))]),
                           max_new_tokens=60)
    lung = [parse(t)["lung"] for t in texts]
    want = pd.read_parquet(root / "val.parquet")["lung"].tolist()
    hits = sum(a == b for a, b in zip(lung, want))
    assert len(set(lung)) == 3, lung
    assert hits >= len(want) - 1, list(zip(lung, want))


def test_selection_by_validation_clinical_f1_keeps_the_best_epoch(learnable, tmp_path):
    """select_by val_ca_f1: the validation reports are generated and scored every 5 epochs, the run ends
    with the weights of the best-scoring epoch (bit-equal to the checkpoint written at that step), and
    those weights generate validation reports that score exactly the logged F1."""
    from safetensors.torch import load_file

    from model.generate import generate_texts
    from model.selection import macro_ca_f1, reference_texts, report_text

    root, out = learnable, tmp_path / "select"
    steps_per_epoch = 48 // 8
    params = {**EXACT, "epochs": 20, "batch_size": 8, "lr": 1e-2, "use_attributes": False, "log_every": 5,
              "select_by": "val_ca_f1", "select_every": 5, "select_max_new_tokens": 60,
              "checkpoint_every": 5 * steps_per_epoch, "keep_checkpoints": 10}
    args = ["--stage", "2", "--params-json", json.dumps(params), "--features", root / "shard-0.zarr",
            "--attributes", root / "attributes.parquet", "--train-reports", root / "train.parquet",
            "--val-reports", root / "val.parquet", "--llm", root / "llm", "--out", out]
    run_cli("model.train", *args)
    recs = log_records(out)
    scored = [r for r in recs if "val_ca_f1" in r and "event" not in r]
    assert [r["epoch"] for r in scored] == [5, 10, 15, 20]
    assert len([r for r in recs if "val_loss" in r]) == 20  # the loss is still validated every epoch
    scores = [r["val_ca_f1"] for r in scored]
    assert all(s is not None for s in scores) and max(scores) > 0
    chosen = [r for r in recs if r.get("event") == "selected"]
    assert len(chosen) == 1 and chosen[0]["val_ca_f1"] == max(scores)
    first_best = scores.index(max(scores))
    assert chosen[0]["epoch"] == scored[first_best]["epoch"]  # ties keep the earlier weights
    assert [r["selected"] for r in scored] == [i == 0 or s > max(scores[:i]) for i, s in enumerate(scores)]
    assert not (out / "selection").exists()  # its weights are now the folder's

    model = MedRegionCT.from_pretrained(out)
    own = model.state_dict()
    ckpt = load_file(str(out / "checkpoints" / f"step-{chosen[0]['step']}" / "model.safetensors"))
    assert ckpt and all(torch.equal(own[k], v) for k, v in ckpt.items())
    last = load_file(str(out / "checkpoints" / f"step-{20 * steps_per_epoch}" / "model.safetensors"))
    if chosen[0]["epoch"] != 20:  # then the folder is not simply the last weights
        assert not all(torch.equal(own[k], v) for k, v in last.items())

    ds = build_dataset([root / "shard-0.zarr"], [root / "attributes.parquet"], root / "val.parquet",
                       model.tokenizer, stage=2, use_mask_tokens=True, use_attributes=False,
                       n_vision=model.config.n_vision, with_targets=False)
    raw = generate_texts(model, ds, batch_size=8, max_new_tokens=60)
    f1, _ = macro_ca_f1(reference_texts(root / "val.parquet", ds.volume_ids),
                        [report_text(raw[v], 2) for v in ds.volume_ids])
    assert f1 == chosen[0]["val_ca_f1"]


def test_selection_without_any_named_class_keeps_the_last_weights(tiny, tmp_path):
    """Validation references that name no class give no score: the run says so, logs it and ends on
    the last weights instead of failing or saving nothing."""
    val = pd.read_parquet(tiny / "val.parquet")
    val["findings"] = "The lungs are clear."
    val.to_parquet(tmp_path / "normal_val.parquet")
    out = tmp_path / "run"
    params = {**EXACT, "epochs": 2, "select_by": "val_ca_f1", "select_max_new_tokens": 8}
    args = train_args(tiny, 2, out, params)
    args[args.index("--val-reports") + 1] = tmp_path / "normal_val.parquet"
    proc = run_cli("model.train", *args)
    assert "no validation reference names a class, keeping the last weights" in proc.stderr
    recs = log_records(out)
    assert [r["val_ca_f1"] for r in recs if "val_ca_f1" in r and "event" not in r] == [None, None]
    assert [r for r in recs if r.get("event") == "selected"][0]["val_ca_f1"] is None
    assert (out / "medregion_config.json").exists() and not (out / "selection").exists()


# ---- benchmark scripts, CPU modes -----------------------------------------------------------------


def test_gpu_train_step_script_tiny_cpu(tmp_path):
    """The GPU comparison script's code path in tiny shapes on CPU: every variant runs, and each one's loss on
    the fixed batch matches today's step (packed samples included)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_train_step.py"), "--tiny", "--device", "cpu",
         "--out", str(tmp_path), "--tokens", "900", "--warmup", "1", "--steps", "1"],
        cwd=REPO, env=ENV, capture_output=True, encoding="utf-8", errors="replace", timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_train_step.json").read_text(encoding="utf-8"))
    assert res["vision_tokens"] == 356 and res["mask_slots"] == 18 and res["losses_match_today"] is True
    by = {v["variant"]: v for v in res["variants"]}
    assert list(by) == ["today", "logits_on_targets", "no_checkpointing", "packed", "fused_adamw", "bf16_lora"]
    assert not any("skipped" in v for v in by.values())
    assert by["today"]["samples_per_step"] == 1 and by["today"]["tokens_per_step"] == 900
    lengths = res["sample_lengths"]
    assert by["packed"]["samples_per_step"] == 4  # no padding: a step's tokens are its samples' lengths
    assert by["packed"]["tokens_per_step"] in (sum(lengths[:4]), sum(lengths[4:8]))
    for v in by.values():
        assert v["tokens_per_s"] > 0 and v["fraction_of_matmul_rate"] > 0 and np.isfinite(v["loss_fixed_batch"])
        assert v["loss_rel_diff_to_today"] <= res["tolerance_rel_loss"]


def test_checkpoint_averaging_loads_the_mean_of_the_trainable_weights(tiny, tmp_path):
    """benchmarks/selection_curve.py's checkpoint_model: one checkpoint's weights as they are, several
    averaged element-wise, a checkpoint with other tensors refused."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "benchmarks"))
    from selection_curve import checkpoint_model

    model = make_model(tiny, stage=2)
    model.save_pretrained(tmp_path / "model")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    base = {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}
    assert any("lora" in n for n in base) and any("lora" not in n for n in base)  # adapter and connector
    for name, shift in (("a", 1.0), ("b", 3.0)):
        (tmp_path / name).mkdir()
        save_file({n: (t + shift).contiguous() for n, t in base.items()}, str(tmp_path / name / "model.safetensors"))

    def trainable(folder: Path) -> dict[str, torch.Tensor]:
        return {n: t for n, t in MedRegionCT.from_pretrained(folder).state_dict().items() if n in names}

    checkpoint_model(tmp_path / "model", [tmp_path / "a"], tmp_path / "one")
    checkpoint_model(tmp_path / "model", [tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    one, mean = trainable(tmp_path / "one"), trainable(tmp_path / "mean")
    assert one.keys() == mean.keys() == base.keys()
    for n, t in base.items():
        assert torch.equal(one[n], t + 1.0), n
        torch.testing.assert_close(mean[n], t + 2.0, rtol=0, atol=1e-6)
    (tmp_path / "c").mkdir()
    save_file({n: t.contiguous() for n, t in list(base.items())[1:]}, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(SystemExit, match="other tensors"):
        checkpoint_model(tmp_path / "model", [tmp_path / "a", tmp_path / "c"], tmp_path / "bad")
