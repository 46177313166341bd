"""The offline NLTK-style METEOR and its Porter stemmer: hand-computed cases, and parity with NLTK itself on
the 800 CT-RATE reports when NLTK is importable (it is not a dependency; the check is skipped otherwise)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline.evaluate import meteor_nltk
from pipeline.evaluate.nlg import normalize_text
from pipeline.evaluate.porter import stem

CTRATE_CSV = Path(__file__).parents[1] / ".." / "shared" / "data" / "ctrate-text-classifier" / "train.csv"


@pytest.mark.parametrize(
    "word, expected",
    [
        ("caresses", "caress"), ("ponies", "poni"), ("ties", "tie"), ("cats", "cat"), ("agreed", "agre"),
        ("plastered", "plaster"), ("motoring", "motor"), ("hopping", "hop"), ("filing", "file"),
        ("happy", "happi"), ("relational", "relat"), ("generalization", "gener"), ("effusions", "effus"),
        ("nodules", "nodul"), ("nodular", "nodular"), ("atelectatic", "atelectat"), ("dying", "die"),
        ("observed", "observ"), ("thickening", "thicken"), ("is", "is"), ("lungs", "lung"),
    ],
)
def test_porter_stem_examples(word, expected):
    assert stem(word) == expected


def test_meteor_hand_computed():
    # exact stage, hypothesis words right to left: 'the' takes the right-most 'the' of the reference (NLTK's
    # greedy rule) -> matches (0,4) (1,1) (2,2) (3,3) (5,5): m 5, 3 chunks, P = R = 5/6
    score = meteor_nltk.meteor(["the", "cat", "sat", "on", "the", "mat"], ["the", "cat", "sat", "on", "a", "mat"])
    assert score == pytest.approx((1 - 0.5 * (3 / 5) ** 3) * 5 / 6)
    # stem stage: nodule ~ nodules; was / were do not share a Porter stem -> m 2, 2 chunks
    score = meteor_nltk.meteor(["nodules", "were", "observed"], ["nodule", "was", "observed"])
    assert score == pytest.approx((1 - 0.5) * 2 / 3)
    assert meteor_nltk.meteor(["a"], []) == 0.0 and meteor_nltk.meteor(["a"], ["b"]) == 0.0
    with pytest.raises(TypeError):
        meteor_nltk.meteor("a b", "a b")


def test_meteor_synonym_stage_is_optional():
    syn = {"enlarg": ["increas"]}  # as in NLTK, the synonym stage sees the words left over as Porter stems
    ref, hyp = ["heart", "size", "increased"], ["heart", "size", "enlarged"]
    without = meteor_nltk.meteor(ref, hyp)
    with_syn = meteor_nltk.meteor(ref, hyp, synonyms=lambda w: syn.get(w, []))
    assert with_syn > without


def _reports() -> list[str]:
    if not CTRATE_CSV.exists():
        pytest.skip(f"{CTRATE_CSV} not present")
    return pd.read_csv(CTRATE_CSV)["report_text"].fillna("").tolist()


def test_porter_matches_nltk_on_ctrate_vocabulary():
    nltk_porter = pytest.importorskip("nltk.stem.porter")
    ps = nltk_porter.PorterStemmer()
    vocab = {w for t in _reports() for w in re.findall(r"[a-z]+", t.lower())}
    bad = [(w, ps.stem(w), stem(w)) for w in sorted(vocab) if ps.stem(w) != stem(w)]
    assert not bad, bad[:10]


def test_meteor_matches_nltk_without_wordnet():
    nltk_meteor = pytest.importorskip("nltk.translate.meteor_score")

    class NoWordNet:
        def synsets(self, word):
            return []

    texts = [normalize_text(t) for t in _reports()]
    rng = random.Random(0)
    pairs = [(texts[i], texts[rng.randrange(len(texts))]) for i in range(300)] + [(t, t) for t in texts[:20]]
    for ref, hyp in pairs:
        expected = nltk_meteor.single_meteor_score(ref.split(), hyp.split(), wordnet=NoWordNet())
        assert meteor_nltk.meteor(ref.split(), hyp.split()) == pytest.approx(expected, abs=1e-12)
