"""Tests of model/: prompt, splice, labels, trainability, persistence, data, and the train/generate CLIs.

Everything runs on a tiny Llama (hidden 32, 2 layers) with a tokenizer trained on the reports, and a feature
shard with C=16 written with pipeline.feature_store.write_feature_shard (fixture `tiny`, tests/conftest.py).
No network, CPU only.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO, C, log_records, make_config, make_dataset, make_model, run_cli, run_process_group, train_args
from transformers import AutoModelForCausalLM

from model.data import Collator, LengthGroupedBatchSampler, ReportDataset
from model.demo_llm import build_demo_llm
from model.demo_llm import main as demo_llm_main
from model.network import CONFIG_NAME, MedRegionCT, MedRegionCTConfig
from model.prompt import (
    IGNORE_INDEX,
    IMG_TOKEN,
    MASK_TOKEN,
    POS_TOKEN,
    build_prompt_text,
    encode_prompt,
    format_structured,
    format_target,
    merge_regions,
    parse_structured,
)
from pipeline.constants import REGIONS, TOKEN_MASKS
from pipeline.feature_store import FeatureStore

# ---- prompt --------------------------------------------------------------------------------------


def test_prompt_counts_and_switches(tiny):
    model = make_model(tiny)
    tok = model.tokenizer
    img, msk, pos = tok.convert_tokens_to_ids([IMG_TOKEN, MASK_TOKEN, POS_TOKEN])
    attr = "Organ Volumes:\nLiver: 1500 ml\nLesion Details: none"

    text = build_prompt_text(attr, use_mask_tokens=True, use_attributes=True)
    assert text.startswith("The global visual information is provided here: <img>")
    assert text.endswith("\nDescribe this medical scan with findings.")
    assert "lung<mask><pos>, airway<mask><pos>" in text and text.index("airway<mask>") < text.index(
        "effusion<mask>"
    )
    assert "Additional clinical attribute information is provided as follows:\n" + attr in text
    ids = encode_prompt(tok, text)
    assert ids.count(img) == 356 and ids.count(msk) == 9 and ids.count(pos) == 9
    assert ids[0] == tok.bos_token_id
    # each <mask> is directly followed by its <pos>
    assert all(ids[i + 1] == pos for i, t in enumerate(ids) if t == msk)

    off = encode_prompt(tok, build_prompt_text(attr, use_mask_tokens=False, use_attributes=False))
    assert off.count(img) == 356 and off.count(msk) == 0 and off.count(pos) == 0
    text_off = build_prompt_text(attr, use_mask_tokens=True, use_attributes=False)
    assert "Organ Volumes" not in text_off and "Additional clinical attribute" not in text_off
    assert "<mask>" not in build_prompt_text(attr, use_mask_tokens=False, use_attributes=True)
    with pytest.raises(ValueError):
        build_prompt_text(None, use_attributes=True)


def test_dataset_prompt_follows_stage_and_switches(tiny):
    m2 = make_model(tiny, stage=2)
    tok = m2.tokenizer
    img, msk = tok.convert_tokens_to_ids([IMG_TOKEN, MASK_TOKEN])
    ds = make_dataset(tiny, m2)
    ids = ds[0]["input_ids"].tolist()
    assert ids.count(img) == 356 and ids.count(msk) == len(TOKEN_MASKS)
    assert "Right Upper Lobe: 1000 ml" in tok.decode(ids)
    ds_off = make_dataset(tiny, m2, use_mask_tokens=False, use_attributes=False)
    ids_off = ds_off[0]["input_ids"].tolist()
    assert ids_off.count(msk) == 0 and "Right Upper Lobe" not in tok.decode(ids_off)
    assert "mask_pooled" not in ds_off[0]
    # stage 1 is the image-report warm-up: vision tokens only, full findings as target
    m1 = make_model(tiny, stage=1)
    assert not m1.config.prompt_uses_masks and not m1.config.prompt_uses_attributes


def test_chat_template_is_used_when_present(tiny):
    model = make_model(tiny)
    tok = model.tokenizer
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        ids = encode_prompt(tok, build_prompt_text("attrs"))
        text = tok.decode(ids)
        assert text.startswith(tok.bos_token + "<|user|>The global visual")
        assert text.endswith("<|assistant|>")
        assert ids.count(tok.bos_token_id) == 1
        assert ids.count(tok.convert_tokens_to_ids(IMG_TOKEN)) == 356
    finally:
        tok.chat_template = None


def test_structured_roundtrip_and_tolerance():
    texts = {r: f"Finding about {r}." for r in REGIONS}
    texts["osseous"] = ""
    s = format_structured(texts)
    assert s.splitlines()[0] == "[Lung]: Finding about lung." and "[Osseous]:" in s
    assert parse_structured(s) == texts
    assert merge_regions(texts) == " ".join(texts[r] for r in REGIONS if texts[r])
    # missing sections, other order, repeated header, lower case, junk before the first header
    p = parse_structured("junk [heart]: Big heart.\n[Lung]: Clear. [Lung]: No nodule.")
    assert p == {
        "lung": "Clear. No nodule.",
        "airways": "",
        "mediastinum": "",
        "heart": "Big heart.",
        "osseous": "",
        "abdomen": "",
    }
    for bad in ("", None, 3, "no headers at all", "[Lung", "[Foo]: x"):
        assert parse_structured(bad) == {r: "" for r in REGIONS}
    assert format_target({"findings": " All clear. "}, 1) == "All clear."
    with pytest.raises(ValueError):
        format_target({}, 3)


def test_demo_llm_attribute_texts_are_the_training_volumes_prompts(tmp_path):
    """`--attributes` (llm.demo_attribute_text): the demo LM reads the attribute blocks of the
    training volumes only (no validation or test prompt), each on its own, empty ones left out."""
    from model.demo_llm import attribute_texts, report_volume_ids

    for i, ids in enumerate((["t1", "v1"], ["t2", "t3"])):
        pd.DataFrame({"volume_id": ids, "prompt": [f"Nodule:\n- count: {i}{v}" for v in ids],
                      "nodule_count": [0, 1]}).to_parquet(tmp_path / f"attr-{i}.parquet")
    pd.DataFrame({"volume_id": ["t1", "t2", "t3"], "findings": ["a", "b", "c"]}).to_parquet(tmp_path / "train.parquet")
    frame = pd.read_parquet(tmp_path / "attr-1.parquet")
    frame.loc[1, "prompt"] = "  "
    frame.to_parquet(tmp_path / "attr-1.parquet")
    shards = [tmp_path / "attr-0.parquet", tmp_path / "attr-1.parquet"]
    texts = attribute_texts(shards, report_volume_ids([tmp_path / "train.parquet"]))
    assert texts == ["Nodule:\n- count: 0t1", "Nodule:\n- count: 1t2"]
    assert len(attribute_texts(shards)) == 3  # no filter: every non-empty prompt


def test_demo_llm_init_std_sets_the_initialisation(tmp_path, capsys):
    """llm.demo_init_std: the demo LM's random weights have that std (LLaMA's 0.02 by default), and a
    larger one gives larger attention scores, as a wider LM has at 0.02 (the scores scale with width)."""
    texts = ["The heart is normal.", "No pleural effusion.", "A nodule in the right lung."] * 4
    stds, scores = {}, {}
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))  # unit-RMS inputs, as after the RMSNorm
    for init in (0.02, 0.08):
        out = build_demo_llm(tmp_path / f"llm-{init}", texts, vocab_size=300, hidden_size=64, layers=1, heads=2,
                             seed=0, init_std=init)
        assert json.loads((out / "demo_llm.json").read_text())["init_std"] == init
        llm = AutoModelForCausalLM.from_pretrained(str(out))
        assert llm.config.initializer_range == init
        attn = llm.model.layers[0].self_attn
        stds[init] = float(attn.q_proj.weight.std())
        scores[init] = float((attn.q_proj(x) @ attn.k_proj(x).T).std())
    assert abs(stds[0.02] - 0.02) < 0.002 and abs(stds[0.08] - 0.08) < 0.008
    assert 10 < scores[0.08] / scores[0.02] < 22  # (0.08 / 0.02)^2 = 16
    with pytest.raises(SystemExit):  # a non-positive std is refused before anything is read or built
        demo_llm_main(["--reports", str(tmp_path / "absent.parquet"), "--out", str(tmp_path / "x"),
                       "--params-json", '{"demo_init_std": 0}'])
    assert "llm.demo_init_std must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---- splice and labels ---------------------------------------------------------------------------


def test_splice_puts_embeddings_at_placeholders(tiny):
    model = make_model(tiny).eval()
    ds = make_dataset(tiny, model)
    b = Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]])
    ids = b["input_ids"]
    with torch.no_grad():
        emb = model.build_inputs_embeds(ids, b["vision"], b["mask_pooled"], b["mask_grid"])
        vis = model.connector(b["vision"])
        mtok, stok = model.mask_extractor(b["mask_pooled"], b["mask_grid"])
        table = model.llm.get_input_embeddings()(ids)
    for row in range(2):
        img_pos = (ids[row] == model.img_token_id).nonzero().flatten()
        msk_pos = (ids[row] == model.mask_token_id).nonzero().flatten()
        pos_pos = (ids[row] == model.pos_token_id).nonzero().flatten()
        assert len(img_pos) == 356 and len(msk_pos) == 9 and len(pos_pos) == 9
        torch.testing.assert_close(emb[row, img_pos], vis[row])
        torch.testing.assert_close(emb[row, msk_pos], mtok[row])
        torch.testing.assert_close(emb[row, pos_pos], stok[row])
        other = ~model.placeholder_mask(ids[row])
        torch.testing.assert_close(emb[row, other], table[row, other])
    # the mask token of mask m comes from mask m's features: change mask 3 only
    pooled = b["mask_pooled"].clone()
    pooled[0, 3] += 1.0
    with torch.no_grad():
        emb2 = model.build_inputs_embeds(ids, b["vision"], pooled, b["mask_grid"])
    msk_pos = (ids[0] == model.mask_token_id).nonzero().flatten()
    changed = (emb2[0, msk_pos] - emb[0, msk_pos]).abs().sum(-1) > 0
    assert changed.tolist() == [i == 3 for i in range(9)]


def test_placeholder_count_mismatch_raises(tiny):
    model = make_model(tiny)
    ds = make_dataset(tiny, model)
    b = Collator(model.tokenizer.pad_token_id)([ds[0]])
    ids = b["input_ids"].clone()
    first_img = (ids[0] == model.img_token_id).nonzero()[0, 0]
    ids[0, first_img] = model.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="<img>"):
        model(
            input_ids=ids,
            attention_mask=b["attention_mask"],
            vision=b["vision"],
            mask_pooled=b["mask_pooled"],
            mask_grid=b["mask_grid"],
        )
    with pytest.raises(ValueError, match="<img>"):
        model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            vision=b["vision"][:, :300],
            mask_pooled=b["mask_pooled"],
            mask_grid=b["mask_grid"],
        )
    with pytest.raises(ValueError, match="<mask>"):
        model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            vision=b["vision"],
            mask_pooled=b["mask_pooled"][:, :8],
            mask_grid=b["mask_grid"][:, :8],
        )
    with pytest.raises(ValueError, match="mask features"):
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], vision=b["vision"])


def test_labels_only_on_target_tokens(tiny):
    model = make_model(tiny)
    tok = model.tokenizer
    ds = make_dataset(tiny, model)
    reports = pd.read_parquet(tiny / "train.parquet")
    for i in (0, 1):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        on = labels != IGNORE_INDEX
        n_target = int(on.sum())
        # labelled tokens are exactly the trailing target: formatted text + EOS
        assert on[-n_target:].all() and not on[:-n_target].any()
        assert torch.equal(labels[on], ids[on])
        assert ids[-1].item() == tok.eos_token_id
        target = format_target(reports.iloc[i].to_dict(), 2)
        assert tok.decode(ids[on], skip_special_tokens=True) == target
        assert not model.placeholder_mask(ids)[on].any()
    b = Collator(tok.pad_token_id)([ds[0], ds[1], ds[2]])
    assert ((b["labels"] != IGNORE_INDEX) <= (b["attention_mask"] == 1)).all()
    # stage 1 targets the whole findings text
    m1 = make_model(tiny, stage=1)
    ds1 = make_dataset(tiny, m1)
    it = ds1[0]
    assert (
        m1.tokenizer.decode(it["input_ids"][it["labels"] != IGNORE_INDEX], skip_special_tokens=True)
        == reports.iloc[0]["findings"]
    )


def test_target_truncated_to_max_length_prompt_kept(tiny):
    model = make_model(tiny)
    full = make_dataset(tiny, model)
    i = int(np.argmax(full.prompt_lengths))
    cut = make_dataset(tiny, model, max_length=full.prompt_lengths[i] + 5)
    item = cut[i]
    assert len(item["input_ids"]) == full.prompt_lengths[i] + 5
    assert int((item["labels"] != IGNORE_INDEX).sum()) == 5
    assert torch.equal(item["input_ids"], full[i]["input_ids"][: len(item["input_ids"])])
    assert (item["input_ids"] == model.img_token_id).sum() == 356
    assert max(cut.lengths) == full.prompt_lengths[i] + 5
    with pytest.raises(ValueError, match="max_length"):
        make_dataset(tiny, model, max_length=100)


# ---- trainability --------------------------------------------------------------------------------


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage1_trains_connector_only(tiny):
    model = make_model(tiny, stage=1)
    names = trainable_names(model)
    assert names and all(n.startswith("connector.") for n in names)
    assert model.mask_extractor is None  # stage-1 prompts have no mask tokens
    assert names == {n for n, _ in model.connector.named_parameters(prefix="connector")}
    assert not model.has_lora


def test_stage2_trains_connector_mask_extractor_lora(tiny):
    model = make_model(tiny, stage=2)
    names = trainable_names(model)
    assert {n for n, _ in model.connector.named_parameters(prefix="connector")} <= names
    assert {n for n, _ in model.mask_extractor.named_parameters(prefix="mask_extractor")} <= names
    lora = {n for n in names if "lora_" in n}
    # 7 target projections x 2 layers x (A, B)
    assert len(lora) == 7 * 2 * 2
    for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{target}.lora_A" in n for n in lora)
    assert names == lora | {n for n in names if n.startswith(("connector.", "mask_extractor."))}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert all("lora_" not in n for n in frozen)


@pytest.mark.parametrize("stage", [1, 2])
def test_one_step_changes_only_trainable(tiny, stage):
    model = make_model(tiny, stage=stage)
    ds = make_dataset(tiny, model)
    b = Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**b).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        if not p.requires_grad:
            assert not moved, f"frozen {n} changed"
        elif n.startswith(("connector.", "mask_extractor.")) or "lora_B" in n:
            # (lora_A has zero gradient at the first step because lora_B starts at zero)
            assert moved, f"trainable {n} did not change"
    if stage == 1:
        assert all("lora_" not in n for n in before)


# ---- data ----------------------------------------------------------------------------------------


def test_collator_pads_to_longest_not_max_length(tiny):
    model = make_model(tiny)
    ds = make_dataset(tiny, model)
    a, b = ds[0], ds[1]
    k = len(a["input_ids"]) - 7  # b is made 7 tokens shorter than a
    b = {**b, "input_ids": b["input_ids"][:k], "labels": b["labels"][:k]}
    pad = model.tokenizer.pad_token_id
    for side in ("right", "left"):
        out = Collator(pad, padding_side=side)([a, b])
        n = len(a["input_ids"])
        assert out["input_ids"].shape == (2, n) and n < 2048
        assert out["attention_mask"][1].sum() == n - 7
        padded = slice(n - 7, n) if side == "right" else slice(0, 7)
        assert (out["input_ids"][1, padded] == pad).all()
        assert (out["labels"][1, padded] == IGNORE_INDEX).all()
        assert (out["attention_mask"][1, padded] == 0).all()
        assert out["vision"].shape == (2, 356, C) and out["mask_grid"].shape == (2, 9, 4, 8, 8)


def test_length_grouped_batch_sampler():
    rng = np.random.default_rng(1)
    lengths = rng.integers(100, 2000, size=203).tolist()
    s = LengthGroupedBatchSampler(lengths, batch_size=4, seed=3, mega=10)
    e0 = s.batches()
    assert sorted(i for b in e0 for i in b) == list(range(203)) and len(e0) == len(s) == 51
    assert e0 == LengthGroupedBatchSampler(lengths, batch_size=4, seed=3, mega=10).batches()
    s.set_epoch(1)
    assert s.batches() != e0
    # the longest sample is in the first batch; batches are length-homogeneous
    assert int(np.argmax(lengths)) in e0[0]
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in e0])
    rand = np.mean([np.ptp(rng.choice(lengths, 4)) for _ in range(200)])
    assert spread < rand / 3


def test_dataset_names_missing_ids(tiny, tmp_path):
    model = make_model(tiny)
    rep = pd.read_parquet(tiny / "train.parquet")
    rep.loc[0, "volume_id"] = "ghost_volume"
    rep.to_parquet(tmp_path / "bad.parquet")
    store = FeatureStore([tiny / "shard-0.zarr"])
    with pytest.raises(ValueError, match="ghost_volume"):
        ReportDataset(
            store,
            rep,
            pd.read_parquet(tiny / "attributes.parquet"),
            model.tokenizer,
            stage=2,
            use_mask_tokens=True,
            use_attributes=True,
        )
    attrs = pd.read_parquet(tiny / "attributes.parquet")
    attrs = attrs[attrs.volume_id != "vol001"]
    with pytest.raises(ValueError, match="vol001"):
        ReportDataset(
            store,
            pd.read_parquet(tiny / "train.parquet"),
            attrs,
            model.tokenizer,
            stage=2,
            use_mask_tokens=True,
            use_attributes=True,
        )


# ---- persistence and generation ------------------------------------------------------------------


def test_save_and_load_give_identical_logits(tiny, tmp_path):
    model = make_model(tiny, stage=2)
    ds = make_dataset(tiny, model)
    b = Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # make LoRA B non-zero
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = tmp_path / "run" / "stage2"
    model.save_pretrained(out)
    assert (out / CONFIG_NAME).exists() and (out / "connector_mask.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    cfg = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    assert not os.path.isabs(cfg["llm_path"])  # portable
    loaded = MedRegionCT.from_pretrained(out)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        a = model(**b).logits
        c = loaded(**b).logits
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
    assert loaded.tokenizer.convert_tokens_to_ids(IMG_TOKEN) == model.img_token_id
    with pytest.raises(FileNotFoundError):
        MedRegionCT.from_pretrained(tmp_path / "nowhere")


def test_loss_with_logits_on_targets_equals_the_lms_own_loss(tiny):
    """The LM head on the target positions only gives the LM's own causal loss (fp32: atol 1e-6) and
    the same gradients, on a right-padded batch of different lengths; logits only at those positions."""
    model = make_model(tiny, stage=2).eval()  # no LoRA dropout: both passes see the same network
    ds = make_dataset(tiny, model)
    assert len({ds.lengths[0], ds.lengths[1]}) == 2
    b = Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]])
    losses, grads = {}, {}
    for on_targets in (False, True):
        model.zero_grad()
        model.logits_on_targets = on_targets
        out = model(**b)
        out.loss.backward()
        losses[on_targets] = out.loss.detach()
        grads[on_targets] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        width = out.logits.shape[1]
    predicting = (b["labels"][:, 1:] != IGNORE_INDEX).any(dim=0)
    assert width == int(predicting.sum()) < b["input_ids"].shape[1] / 2
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=1e-6)
    for g_on, g_off in zip(grads[True], grads[False]):
        torch.testing.assert_close(g_on, g_off, rtol=1e-4, atol=1e-6)


def test_placeholder_rows_zero_or_mean_and_old_folders_read_zero(tiny):
    """new_token_init: zero rows (the demo's) or the mean of the existing rows, in the input and, for an
    untied LM, the output matrix; a saved config without the key (written before it existed) reads zero."""
    base = AutoModelForCausalLM.from_pretrained(str(tiny / "llm"))
    n = base.get_input_embeddings().num_embeddings
    for init in ("zero", "mean"):
        model = make_model(tiny, stage=1, new_token_init=init)
        llm = model.llm
        assert llm.get_output_embeddings().weight is not llm.get_input_embeddings().weight  # the demo LM is untied
        for got, old in ((llm.get_input_embeddings().weight, base.get_input_embeddings().weight),
                         (llm.get_output_embeddings().weight, base.get_output_embeddings().weight)):
            assert got.shape[0] == len(model.tokenizer) == n + 3
            want = old.mean(dim=0) if init == "mean" else torch.zeros_like(old[0])
            torch.testing.assert_close(got[n:], want.expand(3, -1).detach())
            torch.testing.assert_close(got[:n], old, rtol=0, atol=0)
    saved = make_config(tiny).to_dict()
    del saved["new_token_init"]
    assert MedRegionCTConfig.from_dict(saved).new_token_init == "zero"
    with pytest.raises(ValueError, match="new_token_init must be 'zero' or 'mean'"):
        make_config(tiny, new_token_init="random")


def test_lora_targets_missing_from_the_lm_are_named(tiny):
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) \['c_attn'\] not found in LlamaForCausalLM"):
        make_model(tiny, stage=2, lora_targets=("q_proj", "c_attn"))


def test_feature_norm_standardises_with_training_statistics_and_is_saved(tiny, tmp_path):
    """feature_norm: the connector's and mask extractor's inputs are z-scored with the training set's
    statistics (present masks only), which travel with the weights; a stage-2 model that loaded stage
    1's connector keeps its statistics and fits only the mask extractor's."""
    model = make_model(tiny, stage=2, feature_norm=True)
    ds = make_dataset(tiny, model)
    items = [ds[i] for i in range(len(ds))]
    items[0]["mask_pooled"][6] = 0.0  # an absent mask (the cache writes zeros): not a sample of the statistics
    assert model.fit_feature_norms(items) == ["connector", "mask_extractor"]
    assert model.fit_feature_norms(items) == []  # fitted once
    vision = torch.cat([it["vision"] for it in items])
    z = model.connector.norm(vision)
    torch.testing.assert_close(z.mean(0), torch.zeros(C), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(C), atol=1e-3, rtol=0)
    pooled = torch.cat([it["mask_pooled"] for it in items])
    present = pooled[pooled.flatten(1).abs().amax(1) > 0]
    assert len(present) == len(pooled) - 1
    torch.testing.assert_close(model.mask_extractor.norm(present).mean(0), torch.zeros_like(present[0]),
                               atol=1e-4, rtol=0)
    out = tmp_path / "norm"
    model.eval().save_pretrained(out)
    loaded = MedRegionCT.from_pretrained(out)
    torch.testing.assert_close(loaded.connector.norm.std, model.connector.norm.std, atol=0, rtol=0)
    assert loaded.mask_extractor.norm.is_fitted
    fresh = make_model(tiny, stage=2, feature_norm=True)
    fresh.load_own_weights(out / "connector_mask.safetensors", strict=False, prefixes=("connector.",))
    assert fresh.fit_feature_norms(items) == ["mask_extractor"]
    assert make_model(tiny, stage=2).connector.norm is None  # off by default: the paper's plain linear


def test_stage1_folder_written_before_a_new_config_field_still_starts_stage2(tiny, tmp_path):
    """A stage-1 folder whose medregion_config.json predates a field (here feature_norm) was trained
    with that field's default: accepted; one trained with another value is refused, naming it."""
    from model.train import TrainConfigError, check_init

    saved = make_config(tiny, stage=1).to_dict()
    saved.pop("feature_norm")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(saved), encoding="utf-8")
    check_init(tmp_path, make_config(tiny, stage=2))
    saved["feature_norm"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(TrainConfigError, match="feature_norm: True -> False"):
        check_init(tmp_path, make_config(tiny, stage=2))


def test_generate_batched_equals_single(tiny):
    model = make_model(tiny, stage=2).eval()
    ds = make_dataset(tiny, model, reports="val.parquet", with_targets=False)
    # prompts of different lengths, so left padding is exercised
    assert len({ds.lengths[i] for i in range(len(ds))}) > 1
    col = Collator(model.tokenizer.pad_token_id, padding_side="left")
    together = model.generate(col([ds[i] for i in range(len(ds))]), max_new_tokens=6)
    alone = [model.generate(col([ds[i]]), max_new_tokens=6)[0] for i in range(len(ds))]
    assert together == alone
    assert all(isinstance(t, str) for t in together)
    short = min(range(len(ds)), key=lambda i: ds.lengths[i])
    long = max(range(len(ds)), key=lambda i: ds.lengths[i])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(Collator(model.tokenizer.pad_token_id, padding_side="right")([ds[long], ds[short]]))


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for name in ("cpu", "single_gpu", "ddp", "deepspeed_zero2"):
        cfg = load_config_from_file(str(REPO / "config" / "accelerate" / f"{name}.yaml"))
        kinds[name] = (str(cfg.distributed_type), cfg.mixed_precision)
    assert kinds["cpu"] == ("DistributedType.NO", "no")
    assert kinds["single_gpu"] == ("DistributedType.NO", "bf16")
    assert kinds["ddp"][0] == "DistributedType.MULTI_GPU"
    assert kinds["deepspeed_zero2"] == ("DistributedType.DEEPSPEED", "bf16")
    ds = load_config_from_file(str(REPO / "config" / "accelerate" / "deepspeed_zero2.yaml"))
    assert ds.deepspeed_config["zero_stage"] == 2


# ---- CLIs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """Stage 1 (short) then stage 2 (32 optimizer steps) through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    s1 = root / "stage1"
    run_cli(
        "model.train",
        *train_args(
            tiny,
            1,
            s1,
            {
                "epochs": 1,
                "batch_size": 4,
                "grad_accum": 1,
                "lr": 1e-2,
                "log_every": 1,
                "checkpoint_every": 0,
            },
        ),
    )
    s2 = root / "stage2"
    run_cli("model.train", *train_args(tiny, 2, s2, STAGE2_PARAMS, "--init", s1))
    return {"root": root, "stage1": s1, "stage2": s2}


STAGE2_PARAMS = {
    "epochs": 8,
    "batch_size": 2,
    "grad_accum": 1,
    "lr": 1e-2,
    "warmup_ratio": 0.1,
    "mask_hidden": 24,
    "lora_r": 4,
    "lora_alpha": 8,
    "log_every": 1,
    "checkpoint_every": 3,
}


def test_train_cli_outputs_and_loss_drops(trained):
    s1, s2 = trained["stage1"], trained["stage2"]
    for out in (s1, s2):
        assert (out / "medregion_config.json").exists()
        assert (out / "loss.png").stat().st_size > 1000
        assert (out / "connector_mask.safetensors").exists()
    assert not (s1 / "adapter").exists() and (s2 / "adapter" / "adapter_model.safetensors").exists()
    recs = log_records(s2)
    assert recs[0]["event"] == "start" and recs[-1]["event"] == "done"
    assert recs[0]["total_steps"] == 32 and recs[0]["trainable_params"] < recs[0]["total_params"]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 32
    # a random tiny LM with a frozen output layer cannot get confident, so the drop is modest
    # (~6.0 -> ~5.7 nats); step-to-step noise is ~0.02
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.15, losses
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 8 and vals[-1] < vals[0]
    lrs = [r["lr"] for r in recs if "lr" in r]
    assert max(lrs) == pytest.approx(1e-2, rel=0.05) and lrs[-1] == pytest.approx(0.0, abs=1e-6)
    # checkpoints: only trainable tensors, complete ones renamed into place, the newest two kept
    ckpts = sorted((s2 / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == ["step-27", "step-30"]
    from safetensors.torch import load_file

    saved = load_file(str(ckpts[-1] / "model.safetensors"))
    assert saved and all(k.startswith(("connector.", "mask_extractor.")) or "lora_" in k for k in saved)
    # stage 2 started from stage 1's connector
    s1_log = log_records(s1)
    assert s1_log[-1]["event"] == "done"


def test_train_resume_continues_from_checkpoint(tiny, trained):
    out = trained["root"] / "resumed"
    params = {**STAGE2_PARAMS, "stop_after_steps": 5}
    run_cli("model.train", *train_args(tiny, 2, out, params, "--init", trained["stage1"]))
    assert not (out / "medregion_config.json").exists()  # interrupted: no final model
    assert (out / "checkpoints" / "step-3" / "trainer_state.json").exists()
    run_cli("model.train", *train_args(tiny, 2, out, STAGE2_PARAMS, "--init", trained["stage1"], "--resume"))
    recs = log_records(out)
    resume = [r for r in recs if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 3
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, 33))  # work after the checkpoint was dropped and redone
    # same RNG stream, same batches: bit-identical to the uninterrupted run
    from safetensors.torch import load_file

    for name in ("connector_mask.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(trained["stage2"] / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_train_rejects_unknown_param(tiny, tmp_path):
    proc = run_cli("model.train", *train_args(tiny, 1, tmp_path / "x", {"epoch": 1}), check=False)
    assert proc.returncode != 0 and "epoch" in proc.stderr


def test_generate_cli_writes_predictions(tiny, trained, tmp_path):
    out = tmp_path / "pred" / "predictions.parquet"
    run_cli(
        "model.generate",
        "--model",
        trained["stage2"],
        "--features",
        tiny / "shard-0.zarr",
        "--attributes",
        tiny / "attributes.parquet",
        "--reports",
        tiny / "val.parquet",
        "--out",
        out,
        "--params-json",
        '{"max_new_tokens": 40, "batch_size": 3}',
    )
    df = pd.read_parquet(out)
    assert list(df.columns) == ["volume_id", *REGIONS, "report", "raw",
                                "empty_sections", "duplicated_sections", "repeated_sections", "degenerate"]
    assert df["volume_id"].tolist() == pd.read_parquet(tiny / "val.parquet")["volume_id"].tolist()
    for _, row in df.iterrows():
        assert row["report"] == merge_regions(parse_structured(row["raw"]))
    assert not list(out.parent.glob("*.tmp*"))  # atomic_output's .<name>.tmp-<pid>


def test_train_two_cpu_processes(tiny, trained, tmp_path):
    """torchrun with 2 gloo ranks: one log, one writer, schedule laid out over the sharded batches."""
    out = tmp_path / "ddp"
    params = {**STAGE2_PARAMS, "epochs": 2, "checkpoint_every": 2}
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "model.launch",  # as the train rule starts it: torchrun --standalone (a free port), 2 gloo ranks
        "--accelerate-config",
        str(REPO / "config" / "accelerate" / "cpu.yaml"),
        "--processes",
        "2",
        "--",
        *map(str, train_args(tiny, 2, out, params, "--init", trained["stage1"])),
    ]
    proc = run_process_group(cmd, env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = log_records(out)
    assert recs[0]["num_processes"] == 2
    # 8 volumes / batch 2 = 4 batches, 2 per rank per epoch
    assert recs[0]["total_steps"] == 4
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step-4" / "random_states_1.pkl").exists()
    assert (out / "medregion_config.json").exists()
