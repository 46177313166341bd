"""Several samples per micro-batch without padding (model.data.Collator(pack=True)): the packed row gives
the padded batch's loss and gradients (fp32, tolerance 1e-5 relative), with the LM head on all positions
or on the targets only, and the trainer with `pack: true` follows the padded run's loss curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import log_records, make_dataset, make_model, run_cli, train_args

from model.data import Collator


@pytest.mark.parametrize("logits_on_targets", [False, True])
def test_packed_batch_gives_the_padded_loss_and_gradients(tiny, logits_on_targets):
    model = make_model(tiny, lora_dropout=0.0)
    model.set_trainable(2)
    model.logits_on_targets = logits_on_targets
    model.eval()  # no dropout: the two batches see the same function
    ds = make_dataset(tiny, model)
    items = [ds[i] for i in range(4)]
    assert len({len(it["input_ids"]) for it in items}) > 1  # lengths differ: the padded batch pads
    padded = Collator(model.tokenizer.pad_token_id)(items)
    packed = Collator(model.tokenizer.pad_token_id, pack=True)(items)
    assert packed["input_ids"].shape == (1, sum(len(it["input_ids"]) for it in items))
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    assert packed["position_ids"][0, len(items[0]["input_ids"])] == 0  # restarts at the second sample

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l_pad, g_pad = loss_and_grads(padded)
    l_pack, g_pack = loss_and_grads(packed)
    assert l_pack == pytest.approx(l_pad, rel=1e-5)
    assert g_pad.keys() == g_pack.keys() and g_pad
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_does_not_cross_samples(tiny):
    """Changing the first sample's tokens leaves the second sample's logits unchanged in a packed row."""
    model = make_model(tiny)
    model.eval()
    model.logits_on_targets = False
    ds = make_dataset(tiny, model)
    a, b, c = ds[0], ds[1], ds[2]
    collate = Collator(model.tokenizer.pad_token_id, pack=True)
    with torch.no_grad():
        one = model(**collate([a, b])).logits[0, len(a["input_ids"]):]
        two = model(**collate([c, b])).logits[0, len(c["input_ids"]):]
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)


def test_trainer_with_packing_follows_the_padded_run(tiny, tmp_path):
    params = {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "log_every": 1, "checkpoint_every": 0,
              "mask_hidden": 24, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "warmup_ratio": 0.1}
    runs = {}
    for pack in (False, True):
        out = tmp_path / f"pack-{pack}"
        run_cli("model.train", *train_args(tiny, 2, out, {**params, "pack": pack, "fused_adamw": pack}))
        runs[pack] = log_records(out)
    losses = {k: [r["loss"] for r in v if "loss" in r and "event" not in r] for k, v in runs.items()}
    assert len(losses[True]) == len(losses[False]) >= 2
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    start = next(r for r in runs[True] if r.get("event") == "start")
    assert start["params"]["pack"] is True and start["params"]["fused_adamw"] is True  # recorded in the log
    json.dumps(start)
