"""The Hugging Face ``evaluate`` variants (pipeline.evaluate.hf_evaluate) against their reference libraries on
real CT-RATE text, hand-computed BLEU cases, and METEOR through NLTK itself (~55 s on the shared 2-core
machine at load ~10, most of it NLTK's uncached METEOR with WordNet on 260 pairs).

Pairs: 260 reports of ../shared/data/ctrate-text-classifier/train.csv, each with another report (shuffled) or
an edited copy of itself (sentences reordered, words dropped, synonyms swapped in); skipped when the data
are absent. Tolerance 1e-6 everywhere.
"""

from __future__ import annotations

import math
import random
import socket
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import SHARED_DATA, no_network_prefix

from pipeline.evaluate import hf_evaluate
from pipeline.evaluate.nlg import MeteorNotRun, WordNetNotRun, nlg_scores, normalize_text, open_wordnet

REPO = Path(__file__).resolve().parents[1]
SYNONYMS = {"enlarged": "increased", "normal": "usual", "lesion": "wound", "observed": "detected", "heart": "cardiac"}


def _edit(text: str, rng: random.Random) -> str:
    sentences = [s for s in text.split(". ") if s]
    rng.shuffle(sentences)
    words = " . ".join(sentences).split()
    out = []
    for w in words:
        if rng.random() < 0.1:
            continue  # dropped
        out.append(SYNONYMS.get(w.lower(), w) if rng.random() < 0.7 else w)
    return " ".join(out)


@pytest.fixture(scope="module")
def ctrate_pairs() -> list[tuple[str, str]]:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not present at {SHARED_DATA}")
    texts = pd.read_csv(SHARED_DATA / "ctrate-text-classifier" / "train.csv")["report_text"].fillna("").tolist()
    rng = random.Random(25)
    idx = rng.sample(range(len(texts)), 260)
    pairs = [(texts[i], texts[rng.randrange(len(texts))]) for i in idx[:130]]
    pairs += [(texts[i], _edit(texts[i], rng)) for i in idx[130:]]
    return pairs


@pytest.fixture(scope="module")
def wordnet():
    wn = open_wordnet()
    if isinstance(wn, WordNetNotRun):
        pytest.skip(wn.reason)
    return wn


# ---------------------------------------------------------------------------------------------- BLEU
def _every_order_add_one(p_n, *args, **kwargs):
    return [Fraction(p.numerator + 1, p.denominator + 1) for p in p_n]


def test_bleu_evaluate_matches_nltk_sentence_bleu_with_add_one(ctrate_pairs):
    from nltk.translate.bleu_score import sentence_bleu

    refs, hyps = zip(*ctrate_pairs)
    ours = hf_evaluate.bleu_per_report(refs, hyps, 4)
    compared = 0
    for i, (ref, hyp) in enumerate(ctrate_pairs):
        r, h = hf_evaluate.tokenize_13a(ref), hf_evaluate.tokenize_13a(hyp)
        # NLTK returns 0 without a unigram match and counts a missing n-gram order as 1 guess; real reports
        # have neither case, which the count below checks
        if len(h) < 4 or not set(r) & set(h):
            continue
        for n in range(1, 5):
            expected = sentence_bleu([r], h, weights=(1 / n,) * n, smoothing_function=_every_order_add_one)
            assert ours[n][i] == pytest.approx(expected, abs=1e-6), (i, n)
        # the corpus function on one pair is the per-report value
        assert hf_evaluate.compute_bleu([[r]], [h], 4, smooth=True)[0] == pytest.approx(ours[4][i], abs=1e-12)
        compared += 1
    assert compared >= 250


def test_bleu_evaluate_hand_computed_add_one_and_brevity_penalty():
    # shorter prediction, every n-gram matches: precisions (4+1)/(4+1) .. (1+1)/(1+1) = 1, BP = exp(1 - 6/4)
    b = hf_evaluate.bleu_per_report(["a b c d e f"], ["a b c d"], 4)
    for n in range(1, 5):
        assert b[n][0] == pytest.approx(math.exp(-0.5), abs=1e-12)
    # same length, one substitution: 1-grams 3/4 -> 4/5, 2-grams 1/3 -> 2/4, 3-grams 0/2 -> 1/3, 4-grams 0/1 -> 1/2
    b = hf_evaluate.bleu_per_report(["a b c d"], ["a x c d"], 4)
    assert b[1][0] == pytest.approx(4 / 5)
    assert b[2][0] == pytest.approx(math.sqrt(4 / 5 * 2 / 4))
    assert b[4][0] == pytest.approx((4 / 5 * 2 / 4 * 1 / 3 * 1 / 2) ** 0.25)
    # longer prediction: no brevity penalty; a 2-token prediction has no 3-/4-grams: (0+1)/(0+1) = 1
    b = hf_evaluate.bleu_per_report(["a b"], ["a b c"], 4)
    assert b[4][0] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1) ** 0.25)
    b = hf_evaluate.bleu_per_report(["a b c"], ["a b"], 4)
    assert b[4][0] == pytest.approx(math.exp(1 - 3 / 2))
    # 13a splits punctuation and keeps case: "Heart." != "heart"
    assert hf_evaluate.tokenize_13a("Heart is normal.") == ["Heart", "is", "normal", "."]
    # an empty side scores 0 (the NMT function sets BP = 0 there)
    assert hf_evaluate.bleu_per_report(["a b"], [""], 2)[2] == [0.0]
    assert hf_evaluate.compute_bleu([[[]]], [["a"]], 2, smooth=True)[0] == 0.0


# ---------------------------------------------------------------------------------------------- ROUGE
def test_rouge_evaluate_matches_rouge_score(ctrate_pairs):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pairs = [*ctrate_pairs, ("", "a"), ("a", ""), ("Heart: normal!", "heart normal")]
    refs, hyps = zip(*pairs)
    ours = hf_evaluate.rouge_per_report(refs, hyps)
    for i, (ref, hyp) in enumerate(pairs):
        expected = scorer.score(ref, hyp)
        for kind in ("rouge1", "rouge2", "rougeL"):
            assert ours[kind][i] == pytest.approx(expected[kind].fmeasure, abs=1e-6), (i, kind)


# ---------------------------------------------------------------------------------------------- METEOR
def test_meteor_evaluate_matches_nltk_with_wordnet(ctrate_pairs, wordnet):
    from nltk.translate.meteor_score import single_meteor_score

    refs, hyps = zip(*ctrate_pairs)
    ours = hf_evaluate.meteor_per_report(refs, hyps, wordnet=wordnet)
    without = hf_evaluate.meteor_per_report(refs, hyps, wordnet=None)
    for i, (ref, hyp) in enumerate(ctrate_pairs):
        # NLTK itself: its default stemmer, the uncached reader
        expected = single_meteor_score(hf_evaluate.word_tokenize(ref), hf_evaluate.word_tokenize(hyp), wordnet=wordnet)
        assert ours[i] == pytest.approx(expected, abs=1e-6), i
    # the edited copies swap in synonyms: WordNet's stage raises some of them
    assert sum(a > b + 1e-9 for a, b in zip(ours, without)) >= 10
    assert all(a >= b - 1e-12 for a, b in zip(ours, without))


def test_meteor_nltk_entry_is_nltk_without_synonyms(ctrate_pairs):
    from nltk.translate.meteor_score import single_meteor_score

    from pipeline.evaluate.hf_evaluate import NoWordNet

    refs, hyps = zip(*ctrate_pairs[:60])
    s = nlg_scores(refs, hyps, meteor=MeteorNotRun("not needed"), wordnet=WordNetNotRun("not needed"), per_pair=True)
    for i, (ref, hyp) in enumerate(zip(refs, hyps)):
        r, h = normalize_text(ref).split(), normalize_text(hyp).split()
        assert s["_per_pair"]["METEOR-NLTK report-mean"][i] == pytest.approx(
            single_meteor_score(r, h, wordnet=NoWordNet()), abs=1e-12)
    # hand-computed: hypothesis words right to left, 'the' takes the right-most 'the' -> 5 matches, 3 chunks
    score = hf_evaluate.meteor_per_report(["the cat sat on the mat"], ["the cat sat on a mat"], tokenize=str.split)[0]
    assert score == pytest.approx((1 - 0.5 * (3 / 5) ** 3) * 5 / 6)


def test_word_tokenize_is_nltks_with_the_bundled_punkt_model(ctrate_pairs):
    from nltk.tokenize import NLTKWordTokenizer

    text = ctrate_pairs[0][0]
    toks = hf_evaluate.word_tokenize(text)
    # sentence-final periods are split off every sentence (a single-line tokenisation keeps them on the words)
    assert toks.count(".") == text.count(". ") + text.rstrip().endswith(".")
    assert toks == [t for s in hf_evaluate._sentence_tokenizer().tokenize(text) for t in NLTKWordTokenizer().tokenize(s)]
    # the model is NLTK's English one: "dr." is an abbreviation there, not a sentence end
    assert hf_evaluate._sentence_tokenizer().tokenize("Seen by Dr. Smith today. No change.") == [
        "Seen by Dr. Smith today.", "No change."]
    try:  # where NLTK's own punkt_tab is installed, nltk.word_tokenize itself must agree
        import nltk

        expected = [nltk.word_tokenize(ref) for ref, _ in ctrate_pairs]
    except LookupError:
        return
    assert [hf_evaluate.word_tokenize(ref) for ref, _ in ctrate_pairs] == expected


def test_wordnet_absent_or_unreadable_reads_not_run(tmp_path):
    s = nlg_scores(["heart is enlarged"], ["heart is increased"], meteor=MeteorNotRun("no java"),
                   wordnet=open_wordnet(tmp_path / "nowhere"))
    entry = s["METEOR evaluate"]
    assert entry["status"] == "not run" and entry["value"] is None and entry["wordnet"] is False
    assert "nowhere" in entry["reason"] and "wordnet-base" in entry["reason"]
    for key, e in s.items():
        if key not in ("METEOR evaluate", "METEOR", "METEOR report-mean"):
            assert e["value"] is not None, key
    # a folder with the files' names but garbage in them
    for name in hf_evaluate.WORDNET_REQUIRED:
        (tmp_path / name).write_text("not wordnet\n", encoding="utf-8")
    wn = open_wordnet(tmp_path)
    assert isinstance(wn, WordNetNotRun) and "unreadable" in wn.reason and str(tmp_path) in wn.reason
    (tmp_path / "data.noun").unlink()
    wn = open_wordnet(tmp_path)
    assert isinstance(wn, WordNetNotRun) and "data.noun" in wn.reason


def test_meteor_with_wordnet_never_touches_the_network(wordnet, monkeypatch):
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(nltk, "download", refuse)
    s = nlg_scores(["The heart is enlarged. No effusion."], ["Heart size increased. No pleural effusion."],
                   meteor=MeteorNotRun("no java"), wordnet=wordnet)
    assert s["METEOR evaluate"]["wordnet"] is True and s["METEOR evaluate"]["value"] > 0


def test_meteor_with_wordnet_in_a_process_without_network():
    prefix = no_network_prefix()
    if not prefix:
        pytest.skip("no network namespace here (needs root and unshare)")
    if isinstance(open_wordnet(), WordNetNotRun):
        pytest.skip("WordNet not installed")
    code = ("from pipeline.evaluate.nlg import nlg_scores, MeteorNotRun\n"
            "s = nlg_scores(['The heart is enlarged.'], ['Heart size increased.'], meteor=MeteorNotRun('x'))\n"
            "print(s['METEOR evaluate']['wordnet'], s['METEOR evaluate']['value'])\n")
    out = subprocess.run([*prefix, sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    flag, value = out.stdout.split()
    assert flag == "True" and float(value) > 0


def test_cider_d_is_pycocoevalcaps():
    from pycocoevalcap.cider.cider import Cider

    refs = ["the heart is normal in size", "no pleural effusion", "a nodule in the right lung", "lungs are clear"]
    hyps = ["heart is normal", "no effusion", "nodule in the left lung", "lungs clear"]
    s = nlg_scores(refs, hyps, meteor=MeteorNotRun("x"), wordnet=WordNetNotRun("x"), per_pair=True)
    score, per = Cider().compute_score({i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    assert s["CIDEr-D"]["value"] == pytest.approx(score)
    assert np.allclose(s["_per_pair"]["CIDEr-D"], per)
