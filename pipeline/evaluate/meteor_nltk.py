"""NLTK-style sentence METEOR (the algorithm of ``nltk.translate.meteor_score``), offline, no NLTK needed.

Many CT report-generation papers (M3D via Hugging Face ``evaluate``'s "meteor", and MedRegion-CT's table
by its scale) report this METEOR averaged over reports; it runs ~2x higher than the METEOR 1.5 jar on the
same pairs (``anchors.md``). Algorithm, as NLTK 3.9 (Lavie & Agarwal 2007 parameters alpha 0.9, beta 3,
gamma 0.5):

1. align unigrams in stages, each on the words left unmatched by the previous one: exact (lower-cased)
   match, then Porter-stem match (:mod:`pipeline.evaluate.porter`, NLTK's default mode), then WordNet
   synonyms; in each stage hypothesis words are visited from the last to the first and each takes the
   right-most remaining reference word it matches;
2. P = m / len(hyp), R = m / len(ref), Fmean = P R / (alpha P + (1 - alpha) R);
3. chunks = runs of matches adjacent in both texts (matches sorted by hypothesis position);
   penalty = gamma (chunks / m)^beta; score = (1 - penalty) Fmean; 0 when nothing matches or a side is
   empty.

**WordNet**: NLTK's default third stage needs the WordNet corpus, which cannot be downloaded here. This
implementation runs the exact and stem stages only unless a ``synonyms`` function is given (word ->
iterable of synonyms, e.g. built from a local WordNet). Without it a score is <= NLTK's with WordNet
(equal when no synonym-only match exists); ``IMPLEMENTATION`` says which stages ran. With the stage
disabled it equals ``nltk.translate.meteor_score.single_meteor_score(ref, hyp, wordnet=<no synsets>)``
exactly (checked in ``tests/test_evaluate_nlg.py`` when NLTK is importable).

Input texts are token lists; :func:`pipeline.evaluate.nlg.normalize_text` followed by ``str.split`` is
what the evaluation uses.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from pipeline.evaluate.porter import stem as porter_stem

ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5

IMPLEMENTATION = (
    "pipeline.evaluate.meteor_nltk: NLTK meteor_score algorithm (alpha 0.9, beta 3, gamma 0.5), stages "
    "exact + Porter stem (NLTK mode), no WordNet synonym stage"
)
IMPLEMENTATION_WORDNET = IMPLEMENTATION.replace("no WordNet synonym stage", "WordNet synonym stage on")


def _match(hyp: list[tuple[int, str]], ref: list[tuple[int, str]]):
    """One alignment stage on (original index, key) lists; returns matches and the unmatched rest."""
    positions: dict[str, list[int]] = defaultdict(list)
    for j, (_, w) in enumerate(ref):
        positions[w].append(j)
    matches, used_h, used_r = [], set(), set()
    for i in range(len(hyp) - 1, -1, -1):
        pos = positions.get(hyp[i][1])
        if pos:
            j = pos.pop()
            used_h.add(i)
            used_r.add(j)
            matches.append((hyp[i][0], ref[j][0]))
    return (
        matches,
        [p for i, p in enumerate(hyp) if i not in used_h],
        [p for j, p in enumerate(ref) if j not in used_r],
    )


def _synonym_match(hyp, ref, synonyms: Callable[[str], Iterable[str]]):
    positions: dict[str, list[int]] = defaultdict(list)
    for j, (_, w) in enumerate(ref):
        positions[w].append(j)
    matches, used_h, used_r = [], set(), set()
    for i in range(len(hyp) - 1, -1, -1):
        syns = {s for s in synonyms(hyp[i][1]) if "_" not in s} | {hyp[i][1]}
        best_j, best_w = -1, None
        for s in syns:
            pos = positions.get(s)
            if pos and pos[-1] > best_j:
                best_j, best_w = pos[-1], s
        if best_w is not None:
            positions[best_w].pop()
            used_h.add(i)
            used_r.add(best_j)
            matches.append((hyp[i][0], ref[best_j][0]))
    return (
        matches,
        [p for i, p in enumerate(hyp) if i not in used_h],
        [p for j, p in enumerate(ref) if j not in used_r],
    )


def align(
    reference: Sequence[str], hypothesis: Sequence[str], synonyms: Callable[[str], Iterable[str]] | None = None
) -> list[tuple[int, int]]:
    """(hypothesis index, reference index) matches, sorted by hypothesis index."""
    hyp = [(i, w.lower()) for i, w in enumerate(hypothesis)]
    ref = [(j, w.lower()) for j, w in enumerate(reference)]
    exact, hyp, ref = _match(hyp, ref)
    stemmed, hyp_s, ref_s = _match([(i, porter_stem(w)) for i, w in hyp], [(j, porter_stem(w)) for j, w in ref])
    matches = exact + stemmed
    if synonyms is not None:
        # the synonym stage works on the stems left over, as NLTK's does
        syn, _, _ = _synonym_match(hyp_s, ref_s, synonyms)
        matches += syn
    return sorted(matches, key=lambda m: m[0])


def _chunks(matches: list[tuple[int, int]]) -> int:
    chunks = 1
    for a, b in zip(matches, matches[1:]):
        if not (b[0] == a[0] + 1 and b[1] == a[1] + 1):
            chunks += 1
    return chunks


def meteor(
    reference: Sequence[str],
    hypothesis: Sequence[str],
    synonyms: Callable[[str], Iterable[str]] | None = None,
    alpha: float = ALPHA,
    beta: float = BETA,
    gamma: float = GAMMA,
) -> float:
    """Sentence METEOR of token list ``hypothesis`` against token list ``reference``."""
    if isinstance(reference, str) or isinstance(hypothesis, str):
        raise TypeError("meteor() takes token lists, not strings")
    if not reference or not hypothesis:
        return 0.0
    matches = align(reference, hypothesis, synonyms)
    m = len(matches)
    if m == 0:
        return 0.0
    p, r = m / len(hypothesis), m / len(reference)
    fmean = p * r / (alpha * p + (1 - alpha) * r)
    penalty = gamma * (_chunks(matches) / m) ** beta
    return (1 - penalty) * fmean


def meteor_texts(references: Sequence[str], hypotheses: Sequence[str], **kw) -> list[float]:
    """Per-pair scores of whitespace-tokenised (already normalised) texts."""
    return [meteor(r.split(), h.split(), **kw) for r, h in zip(references, hypotheses, strict=True)]
