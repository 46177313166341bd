"""benchmarks/demo_attention.py: the parts of a prompt, and attention mass against the uniform share."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import REPO, make_dataset, make_model

sys.path.insert(0, str(REPO / "benchmarks"))

from demo_attention import PARTS, attention_by_part, main, part_of_positions  # noqa: E402


def test_each_position_gets_its_part():
    # BOS, 2 vision, text, <mask>, <pos>, attribute text (after the last slot), 2 report tokens
    ids = [1, 7, 7, 5, 8, 9, 5, 6, 3, 3]
    labels = [-100] * 8 + [3, 3]
    got = [PARTS[k] for k in part_of_positions(ids, labels, img_id=7, mask_ids=(8, 9), ignore=-100)]
    assert got == ["prompt text", "vision", "vision", "prompt text", "mask slots", "mask slots",
                   "attribute text", "attribute text", "report so far", "report so far"]
    # without slots (an ablation without mask tokens) nothing is called attribute text by position
    got = [PARTS[k] for k in part_of_positions([1, 7, 5, 3], [-100, -100, -100, 3], 7, (8, 9), -100)]
    assert got == ["prompt text", "vision", "prompt text", "report so far"]


def test_uniform_attention_gives_each_part_its_share(tiny):
    model = make_model(tiny).eval()
    ds = make_dataset(tiny, model)
    queries = [name for name, _ in model.llm.named_parameters() if "q_proj" in name and "lora_" not in name]
    weights = dict(model.llm.named_parameters())

    def scale_queries(factor: float) -> dict:
        with torch.no_grad():
            for name in queries:
                weights[name].mul_(factor)
        return attention_by_part(model, ds, [0, 1])

    # queries x 300: the scores are far from 0, so the attention is not uniform and the mass differs
    # from the share (at LLaMA's init std the 32-wide tiny LM's scores are ~0 and its attention uniform)
    sharp = scale_queries(300.0)
    for layer in sharp["mass"]:
        assert abs(sum(layer) - 1) < 1e-6
    assert abs(sum(sharp["share"]) - 1) < 1e-6 and sharp["report_tokens"] > 0
    assert np.abs(np.array(sharp["mass"]) - np.array(sharp["share"])).max() > 0.01
    # all query weights zero: every score is 0, attention is uniform over the prefix: mass == share
    uniform = scale_queries(0.0)
    assert np.allclose(np.array(uniform["mass"]), np.array([uniform["share"]] * len(uniform["mass"])), atol=1e-9)
    assert uniform["share"] == sharp["share"]


def test_no_volumes_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path), "--volumes", "0"])
    assert "--volumes must be >= 1" in capsys.readouterr().err
