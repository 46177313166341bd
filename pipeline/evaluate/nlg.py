"""Natural-language-generation metrics (BLEU-1..4, METEOR, ROUGE-L) via pycocoevalcap.

Every number this module returns is a ``{"value": float, "implementation": str}`` pair, because the same
metric name means different things in different papers (anchors: jar METEOR ~0.2 vs NLTK-style ~0.3-0.5 on
the same CT-RATE-like text; corpus BLEU vs mean per-report BLEU).

Implementations (pycocoevalcap, PyPI, version read at run time):
  * BLEU-n  - ``Bleu(4)``: corpus-level BLEU (clipped n-gram counts and lengths summed over all pairs,
              brevity penalty with option="closest"), one reference per hypothesis.
  * METEOR  - ``Meteor()``: METEOR 1.5 jar (``-l en -norm``) run under Java; the value is the jar's
              corpus-level aggregate (its final ``EVAL`` line), not a mean of per-pair scores.
  * ROUGE-L - ``Rouge()``: ROUGE-L F-measure (LCS, beta=1.2), mean over pairs.

Texts are normalised by :func:`normalize_text` first; see its docstring. The Java PTB tokenizer of the
COCO pipeline is not used (one more JVM start per call); the normaliser's punctuation stripping plays its
part.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from importlib import metadata

EMPTY_PLACEHOLDER = "emptyreport"

try:
    _PCE_VERSION = metadata.version("pycocoevalcap")
except metadata.PackageNotFoundError:  # pragma: no cover - only when the package is missing
    _PCE_VERSION = "unknown"

_PCE = f"pycocoevalcap-{_PCE_VERSION}"

NORMALISATION = (
    "lowercase; '|||' removed; newlines/tabs -> space; punctuation . , ; : ! ? ( ) [ ] { } \" ' ` removed "
    "except a '.' or ',' inside a number (2.5 mm) and hyphens inside words; whitespace collapsed; an empty "
    f"text becomes the placeholder token '{EMPTY_PLACEHOLDER}' (METEOR's stdio protocol and BLEU break on "
    "empty strings)"
)

IMPLEMENTATIONS: dict[str, str] = {
    **{f"BLEU-{n}": f"{_PCE} Bleu(4) corpus-level (option=closest), BLEU-{n}" for n in range(1, 5)},
    "METEOR": f"{_PCE} Meteor (meteor-1.5.jar, -l en -norm, Java) corpus-level aggregate",
    "ROUGE-L": f"{_PCE} Rouge (ROUGE-L F, beta=1.2) mean over pairs",
}

_PUNCT = re.compile(r"[.,](?!\d)|(?<!\d)[.,]|[;:!?()\[\]{}\"'`“”‘’•·]")
_HYPHEN_EDGE = re.compile(r"(?<!\w)-+|-+(?!\w)")
_WS = re.compile(r"\s+")


def normalize_text(text: str | None, strip_punct: bool = True) -> str:
    """Normalise one report for scoring.

    1. ``None``/NaN -> "" ; lowercase;
    2. remove every ``|||`` (METEOR's field separator: one inside a text corrupts the jar's stdio protocol);
    3. newlines, carriage returns and tabs -> spaces (a newline ends METEOR's input line);
    4. if ``strip_punct``: drop punctuation marks (as the COCO PTB tokenizer step does), keeping decimal
       points / commas inside numbers and hyphens inside words;
    5. collapse runs of whitespace to one space and strip;
    6. an empty result becomes the placeholder token ``EMPTY_PLACEHOLDER`` ("emptyreport"): BLEU divides by
       zero-length hypotheses and METEOR's jar stalls or errors on empty segments, so an empty text scores
       (near) zero against a real reference instead of crashing the run.
    """
    if text is None or (isinstance(text, float) and text != text):
        text = ""
    t = str(text).lower().replace("|||", " ")
    t = t.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    if strip_punct:
        t = _PUNCT.sub(" ", t)
        t = _HYPHEN_EDGE.sub(" ", t)
    t = _WS.sub(" ", t).strip()
    return t if t else EMPTY_PLACEHOLDER


class MeteorScorer:
    """One METEOR 1.5 JVM (pycocoevalcap ``Meteor``), reusable across calls; close it when done.

    Start-up costs ~5-20 s, so create it once per process (use as a context manager or call ``close``).
    """

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor()
        self._lock = threading.Lock()
        self.closed = False

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        if self.closed:
            raise RuntimeError("MeteorScorer is closed")
        with self._lock:
            score, scores = self._meteor.compute_score(gts, res)
        return float(score), [float(s) for s in scores]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        p = self._meteor.meteor_p
        try:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
        except OSError:
            pass
        if p.poll() is None:
            p.kill()
        p.wait()
        for stream in (p.stdout, p.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _metric(value: float, name: str) -> dict[str, float | str]:
    return {"value": float(value), "implementation": IMPLEMENTATIONS[name]}


def nlg_scores(
    references: Sequence[str],
    hypotheses: Sequence[str],
    meteor: MeteorScorer | None = None,
    strip_punct: bool = True,
) -> dict[str, dict[str, float | str]]:
    """Corpus BLEU-1..4, METEOR and ROUGE-L of ``hypotheses`` against ``references`` (paired by index).

    Returns ``{"BLEU-1": {"value": x, "implementation": "..."}, ..., "BLEU-4", "METEOR", "ROUGE-L"}``.
    Pass a shared :class:`MeteorScorer` to avoid a JVM start per call; without one, a scorer is created
    and closed here.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    references = list(references)
    hypotheses = list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references vs {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("nlg_scores needs at least one pair")
    gts = {i: [normalize_text(r, strip_punct)] for i, r in enumerate(references)}
    res = {i: [normalize_text(h, strip_punct)] for i, h in enumerate(hypotheses)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    own = meteor is None
    scorer = MeteorScorer() if own else meteor
    try:
        met, _ = scorer.compute_score(gts, res)
    finally:
        if own:
            scorer.close()

    out = {f"BLEU-{n + 1}": _metric(bleu[n], f"BLEU-{n + 1}") for n in range(4)}
    out["METEOR"] = _metric(met, "METEOR")
    out["ROUGE-L"] = _metric(rouge, "ROUGE-L")
    return out
