"""Adapters of the evaluation: GREEN (parser + local-model plumbing), the M3D-style LLM judge (against a local
HTTP server started here) and the RadBERT labeler backend (a tiny random RoBERTa built here)."""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import JudgeHandler

from pipeline.constants import CTRATE_CLASSES, REGIONS
from pipeline.evaluate import green, judge
from pipeline.evaluate.labeler import load_labeler

REF = "Millimetric nodules are observed in both lungs. Pleural effusion on the right. Heart size increased."
HYP = "Millimetric nodules in both lungs. No pleural effusion. Heart size is normal."

# ---------------------------------------------------------------------------------------------- GREEN
# Answers in the shapes GREEN-RadLlama2-7b produces (layouts seen in the recorded responses shipped with the
# GREEN repository: leading ":" line, all six sub-categories or only some, "None." sections, "0." matches,
# "</s>" at the end), written for CT findings. No GREEN model is available here to record our own.
ANSWER_FULL = """:
The candidate misses the pleural effusion and understates the heart size.

[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 0.
(b) Missing a finding present in the reference: 1. Right pleural effusion.
(c) Misidentification of a finding's anatomic location/position: 0.
(d) Misassessment of the severity of a finding: 1. Heart size reported normal instead of increased.
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 0.

[Clinically Insignificant Errors]:
(a) False report of a finding in the candidate: 0.
(b) Missing a finding present in the reference: 0.
(c) Misidentification of a finding's anatomic location/position: 0.
(d) Misassessment of the severity of a finding: 0.
(e) Mentioning a comparison that isn't in the reference: 0.
(f) Omitting a comparison detailing a change from a prior study: 0.

[Matched Findings]:
2. Millimetric nodules in both lungs; Heart is evaluated.</s>"""

ANSWER_PARTIAL = """:
The candidate reports a consolidation that is not in the reference.

[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 1. Consolidation in the right lower lobe.
(c) Misidentification of a finding's anatomic location/position: 2. Nodule side; Effusion side.

[Clinically Insignificant Errors]:
None.

[Matched Findings]:
3. Emphysema; Atelectasis; Hiatal hernia.</s>"""

ANSWER_NO_MATCH = """[Explanation]:
Nothing of the reference is reported.

[Clinically Significant Errors]:
(b) Missing a finding present in the reference: 3. Nodules; Effusion; Cardiomegaly.

[Clinically Insignificant Errors]:
No errors.

[Matched Findings]:
0.</s>"""

ANSWER_NUMBERED = """[Clinically Significant Errors]:
(1) False report of a finding in the candidate: 0.
(2) Missing a finding present in the reference: 1. Lymphadenopathy.

[Matched Findings]:
4. Emphysema; Nodules; Effusion; Calcification."""

ANSWER_PERFECT = """:
The candidate matches the reference.

[Clinically Significant Errors]:
(a) False report of a finding in the candidate: 0.
(b) Missing a finding present in the reference: 0.

[Matched Findings]:
1. No pleural effusion.</s>"""

ANSWER_GARBLED = "lung lung nodules the the heart"  # what a random model writes


@pytest.mark.parametrize(
    "answer, score, matched, significant",
    [
        (ANSWER_FULL, 2 / 4, 2, [0, 1, 0, 1, 0, 0]),
        (ANSWER_PARTIAL, 3 / 6, 3, [1, 0, 2, 0, 0, 0]),
        (ANSWER_NO_MATCH, 0.0, 0, [0, 3, 0, 0, 0, 0]),
        (ANSWER_NUMBERED, 4 / 5, 4, [0, 1, 0, 0, 0, 0]),
        (ANSWER_PERFECT, 1.0, 1, [0] * 6),
    ],
)
def test_green_parser_on_answers(answer, score, matched, significant):
    p = green.parse_answer(answer)
    assert p["parsed"] and p["green"] == pytest.approx(score)
    assert p["matched"] == matched and p["significant"] == significant


def test_green_unparsed_answer_is_missing_not_zero():
    for text in (ANSWER_GARBLED, "", None):
        p = green.parse_answer(text)
        assert not p["parsed"] and p["green"] is None
    s = green.summarise(["a", "b", "c"], [ANSWER_FULL, ANSWER_GARBLED, ANSWER_PERFECT], "recorded")
    assert s["value"] == pytest.approx((0.5 + 1.0) / 2)  # the garbled answer is left out, not counted as 0
    assert s["n_parsed"] == 2 and s["n_unparsed"] == 1 and s["averaging"] == "report-mean"
    assert s["per_report"][1]["green"] is None
    assert s["significant_error_rate"][green.SUB_CATEGORIES[1]] == pytest.approx(0.5)
    json.dumps(s, allow_nan=False)
    failed = green.summarise(["a"], [ANSWER_GARBLED], "recorded")
    assert failed["status"] == "failed" and failed["value"] is None


def test_green_prompt_carries_both_reports_and_the_format():
    prompt = green.make_prompt(REF, HYP)
    assert REF in prompt and HYP in prompt
    assert prompt.index(REF) < prompt.index(HYP)
    for section in ("[Explanation]:", "[Clinically Significant Errors]:", "[Clinically Insignificant Errors]:",
                    "[Matched Findings]:"):
        assert section in prompt


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    from model.demo_llm import build_demo_llm

    out = tmp_path_factory.mktemp("green") / "tiny-green"
    texts = [REF, HYP, green.make_prompt(REF, HYP), ANSWER_FULL] * 5
    build_demo_llm(out, texts, vocab_size=400, hidden_size=32, layers=1, heads=2, max_position_embeddings=4096)
    return out


def _pairs_files(tmp_path: Path) -> tuple[Path, Path]:
    ids = ["train_1_a_1", "train_2_a_1"]
    pred = pd.DataFrame({"volume_id": ids, "report": [HYP, ""], **{r: ["", ""] for r in REGIONS}})
    ref = pd.DataFrame({"volume_id": ids, "findings": [REF, REF], **{r: ["", ""] for r in REGIONS}})
    pp, rp = tmp_path / "pred.parquet", tmp_path / "ref.parquet"
    pred.to_parquet(pp)
    ref.to_parquet(rp)
    return pp, rp


def test_green_local_model_plumbing(tiny_llm, tmp_path):
    """A tiny random Llama answers the GREEN prompts end to end (CLI -> green.json -> metrics.json)."""
    model = green.GreenModel(tiny_llm, device="cpu", batch_size=2, max_new_tokens=6, max_length=4096)
    answers = model.answer([green.make_prompt(REF, HYP), green.make_prompt(REF, "")])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    # with a chat template in GREEN's {"from", "value"} message form
    model.tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['from'] }}: {{ m['value'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}gpt: {% endif %}"
    )
    text = model.chat_text("PROMPT")
    assert text.startswith("<s>human: PROMPT") and text.endswith("gpt: ")
    assert len(model.answer(["PROMPT"])) == 1

    pp, rp = _pairs_files(tmp_path)
    out = tmp_path / "green.json"
    rc = green.main(["--predictions", str(pp), "--references", str(rp), "--model", str(tiny_llm), "--out", str(out),
                     "--params-json", '{"device": "cpu", "max_new_tokens": 4, "batch_size": 2}'])
    assert rc == 0
    g = json.loads(out.read_text(encoding="utf-8"))
    assert g["n_pairs"] == 2 and len(g["per_report"]) == 2 and g["per_report"][0]["volume_id"] == "train_1_a_1"
    # a random model does not write GREEN's format: missing, reported, never 0
    assert g["n_unparsed"] == 2 and g["value"] is None and g["status"] == "failed"
    assert "tiny-green" in g["implementation"]

    from pipeline.evaluate import run as run_mod
    from pipeline.evaluate.nlg import MeteorNotRun

    pairs = run_mod.load_pairs(pp, rp)
    m = run_mod.evaluate(pairs, None, "x", meteor=MeteorNotRun("not needed here"),
                         green=run_mod.load_adapter_result(out, "GREEN", "green"))
    assert m["green"]["status"] == "failed" and "per_report" not in m["green"]
    from pipeline.evaluate.table import build_table

    df, _, _ = build_table([m])
    assert df.loc[0, "GREEN report-mean"] == "n/a" and df.loc[0, "Judge 0-100 report-mean"] == "not run"


def test_green_scores_flow_from_answers(tmp_path):
    class Recorded:
        name = "recorded"

        def answer(self, prompts):
            assert all("[Matched Findings]" in p for p in prompts)
            return [ANSWER_FULL, ANSWER_PERFECT][: len(prompts)]

    s = green.score([REF, REF], [HYP, REF], ["a", "b"], Recorded())
    assert s["value"] == pytest.approx(0.75) and s["status"] == "ok"


# ---------------------------------------------------------------------------------------------- judge
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 85", 85.0),
        ("Score: 72.5.", 72.5),
        ("The prediction covers most aspects.\nScore: 60.", 60.0),
        ("**Score:** 40/100", 40.0),
        ("score = 7.5/10", 75.0),
        ("Score: 90%", 90.0),
        ("The output format is:\nScore: xx.\nScore: 35", 35.0),
        ("Score: xx.", None),
        ("I cannot evaluate this.", None),
        ("Score: 150", None),
        ("Score: 1000", None),
        ("", None),
        (None, None),
    ],
)
def test_judge_score_parsing(text, expected):
    assert judge.parse_score(text) == expected


@pytest.fixture
def judge_server():
    JudgeHandler.answers = {
        "P1": ["Score: 85"],
        "P2": ["Most aspects are covered. Score: 72.5."],
        "P3": ["It is a decent report."],  # no score: missing
        "P4": [500],  # always fails: missing, counted as a failed request
        "P5": ["**Score:** 40/100"],
        "P6": [503, "Score: 60"],  # one transient failure, then an answer (retry)
    }
    JudgeHandler.seen_auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_against_local_server(judge_server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    client = judge.JudgeClient(judge_server, "tiny-judge", api_key_env="TEST_JUDGE_KEY", retries=2, backoff_s=0.01,
                               timeout_s=10)
    preds = ["P1", "P2", "P3", "P4", "P5", "P6"]
    res = judge.score(["ground truth"] * 6, preds, [f"v{i}" for i in range(6)], client, max_workers=3)
    scores = [r["score"] for r in res["per_report"]]
    assert scores == [85.0, 72.5, None, None, 40.0, 60.0]
    assert res["value"] == pytest.approx((85 + 72.5 + 40 + 60) / 4)  # missing scores are left out, not 0
    assert res["n_scored"] == 4 and res["n_missing"] == 2 and res["n_failed_requests"] == 1
    assert res["per_report"][3]["error"] and "500" in res["per_report"][3]["error"]
    assert res["scale"] == "0-100" and res["averaging"] == "report-mean" and "tiny-judge" in res["implementation"]
    assert set(JudgeHandler.seen_auth) == {"Bearer sk-test"}


def test_judge_cli_and_missing_api_key(judge_server, tmp_path):
    with pytest.raises(ValueError, match="NOT_SET_KEY"):
        judge.JudgeClient(judge_server, "m", api_key_env="NOT_SET_KEY")
    ids = ["v1", "v2"]
    pp, rp, out = tmp_path / "p.parquet", tmp_path / "r.parquet", tmp_path / "judge.json"
    pd.DataFrame({"volume_id": ids, "report": ["P1", "P3"]}).to_parquet(pp)
    pd.DataFrame({"volume_id": ids, "findings": ["gt one", "gt two"]}).to_parquet(rp)
    rc = judge.main(["--predictions", str(pp), "--references", str(rp), "--out", str(out),
                     "--params-json", json.dumps({"endpoint": judge_server, "model": "tiny-judge", "retries": 0})])
    assert rc == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["value"] == 85.0 and res["n_missing"] == 1 and res["inputs"]["n_scored"] == 2


def test_judge_unreachable_endpoint_gives_missing_scores():
    client = judge.JudgeClient("http://127.0.0.1:9/v1", "m", retries=0, timeout_s=2)
    res = judge.score(["a"], ["b"], ["v"], client)
    assert res["value"] is None and res["status"] == "failed" and res["n_failed_requests"] == 1


# ---------------------------------------------------------------------------------------------- RadBERT
@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A tiny random RoBERTa + byte-level BPE tokenizer folder, and CT-CLIP-layout classifier weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    root = tmp_path_factory.mktemp("radbert")
    model_dir = root / "RadBERT-tiny"
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([REF, HYP] * 10, trainer)
    backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                          ("<s>", backend.token_to_id("<s>")))
    tok = RobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                               cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                               model_max_length=512)
    tok.save_pretrained(model_dir)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, type_vocab_size=1)
    torch.manual_seed(0)

    class RadBertClassifier(torch.nn.Module):  # CT-CLIP's layout: .model (RoBERTa) + .classifier
        def __init__(self, n_classes):
            super().__init__()
            self.model = RobertaModel(config)
            self.classifier = torch.nn.Linear(config.hidden_size, n_classes)

    net = RadBertClassifier(18).eval()
    net.model.save_pretrained(model_dir)  # config.json (+ encoder weights, for the head-only file)
    state = net.state_dict()
    torch.save(state, root / "classifier.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "classifier.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "wrapped.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("classifier.")}, root / "head_only.pt")
    return {"root": root, "model_dir": model_dir, "net": net, "tokenizer": tok}


def _ctclip_probs(fx, texts):
    """CT-CLIP's inference path: pad to 512, truncate, pooler_output -> Linear -> sigmoid."""
    import torch

    enc = fx["tokenizer"](texts, return_tensors="pt", max_length=512, padding="max_length", truncation=True)
    with torch.no_grad():
        pooled = fx["net"].model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        return torch.sigmoid(fx["net"].classifier(pooled)).numpy()


class NotAStateDict:
    """A pickled object: torch.load(weights_only=True) must refuse it."""


@pytest.mark.parametrize("weights", ["classifier.pt", "classifier.safetensors", "wrapped.pth", "head_only.pt"])
def test_radbert_backend_loads_and_matches_ctclip_inference(tiny_roberta, weights):
    fx = tiny_roberta
    lab = load_labeler("radbert", str(fx["root"] / weights), str(fx["model_dir"]), batch_size=2)
    long_text = " ".join([REF] * 120)  # far beyond 512 tokens: truncated, not an error
    texts = [REF, HYP, "", long_text]
    probs = lab.probabilities(texts)
    assert probs.shape == (4, 18)
    assert np.allclose(probs, _ctclip_probs(fx, texts), atol=1e-5)
    y = lab.label_reports(texts)
    assert y.shape == (4, 18) and y.dtype == np.int64 and set(np.unique(y)) <= {0, 1}
    assert (y == (probs >= 0.5)).all()
    assert lab.CLASSES == CTRATE_CLASSES and "RadBERT" in lab.IMPLEMENTATION


def test_radbert_threshold_and_wider_head(tiny_roberta, tmp_path):
    import torch

    fx = tiny_roberta
    state = {k: v.clone() for k, v in fx["net"].state_dict().items() if not k.startswith("classifier.")}
    w = torch.zeros(20, 32)
    b = torch.tensor([10.0] * 9 + [-10.0] * 9 + [10.0, 10.0])  # 20 outputs: the first 18 are the CT-RATE classes
    state.update({"classifier.weight": w, "classifier.bias": b})
    torch.save(state, tmp_path / "wide.pt")
    lab = load_labeler("radbert", str(tmp_path / "wide.pt"), str(fx["model_dir"]))
    assert lab.n_outputs == 20
    assert lab.label_reports([REF, HYP]).tolist() == [[1] * 9 + [0] * 9] * 2


def test_radbert_refuses_bad_weights(tiny_roberta, tmp_path):
    import torch

    fx = tiny_roberta
    torch.save({"classifier.weight": torch.zeros(18, 7), "classifier.bias": torch.zeros(18)}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="classifier is"):
        load_labeler("radbert", str(tmp_path / "shape.pt"), str(fx["model_dir"]))

    torch.save(NotAStateDict(), tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_labeler("radbert", str(tmp_path / "pickled.pt"), str(fx["model_dir"]))
    with pytest.raises(FileNotFoundError):
        load_labeler("radbert", str(tmp_path / "missing.pt"), str(fx["model_dir"]))
    with pytest.raises(ValueError, match="needs both"):
        load_labeler("radbert", None, str(fx["model_dir"]))
