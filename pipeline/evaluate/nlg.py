"""Natural-language-generation metrics: BLEU-1..4, METEOR, ROUGE and CIDEr-D, each variant labelled.

Every number this module returns is a ``{"value", "implementation", "averaging"}`` dict, because the same
metric name means different things in different papers (the METEOR 1.5 jar gives ~0.2 where NLTK's METEOR
gives ~0.3-0.5 on the same CT-RATE-like text; corpus BLEU differs from mean per-report BLEU). ``averaging``
is ``corpus`` (statistics pooled over all pairs, then one score) or ``report-mean`` (one score per report
pair, then the mean).

Keys and implementations (package versions read at run time):
  * ``BLEU-n``               pycocoevalcap ``Bleu(4)``, corpus level: clipped n-gram matches and lengths
                             summed over all pairs, brevity penalty with option="closest".
  * ``BLEU-n report-mean``   the same call's per-pair sentence BLEU (pycocoevalcap smooths zero counts with
                             1e-9 / 1e-15, i.e. practically unsmoothed), averaged over reports.
  * ``BLEU-n evaluate``      Hugging Face ``evaluate``'s ``bleu`` (smooth=True, max_order=n) per report, mean
                             (:mod:`pipeline.evaluate.hf_evaluate`; raw texts, 13a tokens, add-one).
  * ``METEOR``               METEOR 1.5 jar shipped in pycocoevalcap (``-l en -norm``, exact + stem +
                             synonym + paraphrase modules) under Java, corpus level: the jar's aggregate
                             over all pairs (its final ``EVAL`` line). One JVM per :class:`MeteorScorer`.
  * ``METEOR report-mean``   the jar's per-pair (segment) scores of the same call, averaged over reports.
  * ``METEOR-NLTK report-mean``  NLTK's ``single_meteor_score`` (exact + Porter stem; its WordNet stage
                             given no synsets) on the normalised whitespace tokens, averaged over reports.
  * ``METEOR evaluate``      Hugging Face ``evaluate``'s ``meteor``: NLTK's METEOR with WordNet 3.0 on
                             ``word_tokenize`` tokens of the raw texts, mean over reports. The entry's
                             ``wordnet`` says whether WordNet was used; without a readable WordNet it is
                             "not run" with the reason (config ``evaluate.wordnet``).
  * ``ROUGE-L``              ROUGE-L F-measure (LCS, beta 1.2) per pair exactly as pycocoevalcap ``Rouge``
                             (same whitespace tokens and formula; LCS length computed bit-parallel, equal to
                             its dynamic programme, ~50x faster), averaged over reports.
  * ``ROUGE-1/2/L evaluate`` Hugging Face ``evaluate``'s ``rouge`` (Google ``rouge_score``: its tokenizer,
                             no stemmer, F-measure, beta 1) per report, mean.
  * ``CIDEr-D``              pycocoevalcap ``Cider`` (CIDEr-D: n 1..4, sigma 6, clipped, x10) on the
                             normalised texts; document frequencies from this set's references, per-report
                             scores averaged (pycocoevalcap's own averaging).

METEOR's jar needs Java. When Java is missing or the jar fails, both jar entries are ``{"value": None,
"status": "not run", "reason": ...}`` and every other metric is still computed; likewise ``METEOR
evaluate`` without WordNet.

The pycocoevalcap and NLTK-without-WordNet variants score texts normalised by :func:`normalize_text` (see
``NORMALISATION``); the ``evaluate`` variants score the raw texts with their own tokenizers, as the
peers' scripts do. The Java PTB tokenizer of the COCO pipeline is not used (one more JVM start per call);
the normaliser's punctuation stripping plays its part.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.evaluate import hf_evaluate

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
    "empty strings); tokens = whitespace split of the result (all metrics)"
)

CORPUS, REPORT_MEAN = "corpus", "report-mean"

_NLTK = f"nltk-{hf_evaluate._version('nltk')}"

IMPLEMENTATIONS: dict[str, str] = {
    **{f"BLEU-{n}": f"{_PCE} Bleu(4) corpus-level (option=closest), BLEU-{n}" for n in range(1, 5)},
    **{
        f"BLEU-{n} report-mean": f"{_PCE} Bleu(4) per-pair sentence BLEU-{n} (1e-9 smoothing), mean over reports"
        for n in range(1, 5)
    },
    **{f"BLEU-{n} evaluate": hf_evaluate.BLEU_IMPLEMENTATION.format(n=n) for n in range(1, 5)},
    "METEOR": f"{_PCE} meteor-1.5.jar (-l en -norm, Java) corpus-level aggregate",
    "METEOR report-mean": f"{_PCE} meteor-1.5.jar (-l en -norm, Java) per-pair scores, mean over reports",
    "METEOR-NLTK report-mean": (
        f"NLTK single_meteor_score ({_NLTK}; alpha 0.9, beta 3, gamma 0.5), stages exact + Porter stem, no WordNet "
        "synonym stage, on normalised whitespace tokens; mean over reports"
    ),
    "METEOR evaluate": hf_evaluate.METEOR_IMPLEMENTATION,
    "ROUGE-L": f"ROUGE-L F (beta=1.2) as {_PCE} Rouge (bit-parallel LCS), mean over reports",
    "ROUGE-1 evaluate": hf_evaluate.rouge_implementation("rouge1"),
    "ROUGE-2 evaluate": hf_evaluate.rouge_implementation("rouge2"),
    "ROUGE-L evaluate": hf_evaluate.rouge_implementation("rougeL, LCS, beta 1"),
    "CIDEr-D": (
        f"{_PCE} Cider (CIDEr-D: n-grams 1..4, sigma 6, clipped, x10) on normalised texts, document "
        "frequencies from this set's references; mean of per-report scores"
    ),
}
AVERAGING: dict[str, str] = {k: (CORPUS if k in {f"BLEU-{n}" for n in range(1, 5)} | {"METEOR"} else REPORT_MEAN)
                             for k in IMPLEMENTATIONS}
METRIC_KEYS: tuple[str, ...] = tuple(IMPLEMENTATIONS)
# the per-report variants that scores.parquet keeps, one column each (corpus entries are rebuilt from
# PYCOCO_BLEU_STATS columns; the jar's corpus aggregate only by the jar)
PER_REPORT_KEYS: tuple[str, ...] = tuple(k for k in METRIC_KEYS if AVERAGING[k] == REPORT_MEAN)
PYCOCO_BLEU_STATS: tuple[str, ...] = ("testlen", "reflen", *(f"guess-{n}" for n in range(1, 5)),
                                      *(f"correct-{n}" for n in range(1, 5)))

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


# ---------------------------------------------------------------------------------------------- METEOR jar
class MeteorUnavailable(RuntimeError):
    """Java or the METEOR jar cannot run; the message is the reason reported in metrics.json."""


class MeteorNotRun:
    """Pass as ``meteor=`` to skip the jar and report METEOR as not run with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def meteor_jar_path() -> Path:
    import pycocoevalcap.meteor.meteor as m

    return Path(m.__file__).resolve().parent / "meteor-1.5.jar"


class MeteorScorer:
    """One METEOR 1.5 JVM speaking the jar's ``-stdio`` protocol, reusable across calls; close it when done.

    ``java``: the executable (name on PATH or a path); default ``$MEDREGION_JAVA`` or ``java``. Start-up
    (5-20 s: the jar loads its paraphrase table) happens here, with one probe pair, so a broken Java fails
    at construction with :class:`MeteorUnavailable`. ``MeteorScorer.starts`` counts JVM starts in this
    process (the benchmark checks there is one per evaluation).
    """

    starts = 0

    def __init__(self, java: str | None = None, memory: str = "2G") -> None:
        java = java or os.environ.get("MEDREGION_JAVA") or "java"
        exe = shutil.which(java)
        if exe is None:
            raise MeteorUnavailable(f"Java executable {java!r} not found (PATH / $MEDREGION_JAVA); METEOR jar needs Java")
        jar = meteor_jar_path()
        if not jar.is_file():  # pragma: no cover - broken install
            raise MeteorUnavailable(f"METEOR jar missing at {jar}")
        # UTF-8 whatever the locale (Java 17 otherwise decodes stdin with the platform charset)
        cmd = [exe, f"-Xmx{memory}", "-Dfile.encoding=UTF-8", "-jar", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self._p = subprocess.Popen(
                cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as e:
            raise MeteorUnavailable(f"cannot start {exe}: {e}") from e
        MeteorScorer.starts += 1
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()
        self._lock = threading.Lock()
        self.closed = False
        self.java = exe
        try:
            self.score_pairs(["probe sentence"], ["probe sentence"])
        except MeteorUnavailable:
            self.close()
            raise

    def _drain_stderr(self) -> None:
        for line in iter(self._p.stderr.readline, b""):
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def _fail(self, what: str) -> MeteorUnavailable:
        tail = " | ".join(list(self._stderr)[-5:])
        return MeteorUnavailable(f"METEOR jar {what} (exit code {self._p.poll()}){': ' + tail if tail else ''}")

    def _readline(self) -> str:
        line = self._p.stdout.readline()
        if not line:
            raise self._fail("stopped answering")
        return line.decode("utf-8", "replace").strip()

    def _write(self, line: str) -> None:
        try:
            self._p.stdin.write((line + "\n").encode("utf-8"))
            self._p.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise self._fail(f"closed its input ({e})") from e

    def score_pairs(self, references: Sequence[str], hypotheses: Sequence[str]) -> tuple[float, list[float]]:
        """(corpus aggregate, per-pair scores) of already-normalised, non-empty texts."""
        if self.closed:
            raise MeteorUnavailable("METEOR scorer is closed")
        lines = [
            "SCORE ||| {} ||| {}".format(*(t.replace("|||", " ").replace("\n", " ") for t in pair))
            for pair in zip(references, hypotheses, strict=True)
        ]
        with self._lock:
            # A writer thread streams the SCORE lines while this thread reads the answers: no round trip per
            # pair, and no deadlock when both pipes fill.
            errors: list[BaseException] = []

            def write_all() -> None:
                try:
                    for line in lines:
                        self._write(line)
                except BaseException as e:  # reported by the reader below
                    errors.append(e)

            writer = threading.Thread(target=write_all, daemon=True)
            writer.start()
            try:
                stats = [self._readline() for _ in lines]
            finally:
                writer.join()
            if errors:
                raise errors[0]
            self._write("EVAL ||| " + " ||| ".join(stats))
            try:
                per_pair = [float(self._readline()) for _ in stats]
                corpus = float(self._readline())
            except ValueError as e:
                raise self._fail(f"answered a non-number ({e})") from e
        return corpus, per_pair

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        """pycocoevalcap-style call: ``gts``/``res`` map ids to one-element lists of text."""
        keys = list(gts)
        return self.score_pairs([gts[k][0] for k in keys], [res[k][0] for k in keys])

    def close(self) -> None:
        if getattr(self, "closed", True):
            return
        self.closed = True
        p = self._p
        try:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
        except OSError:
            pass
        if p.poll() is None:
            p.kill()
        p.wait()
        try:
            p.stdout.close()
        except OSError:
            pass
        self._drain.join(timeout=5)

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class MeteorInBackground:
    """The jar's scores of known jobs, computed in a background thread from construction on.

    ``jobs``: the (references, hypotheses) lists, already normalised, that :func:`nlg_scores` will ask
    for; ``score_pairs`` returns a job's (corpus, per-pair) result, waiting for it if need be. The JVM is
    a process of its own, so on 2 cores the jar works while Python computes the other metrics instead
    of before them. ``elapsed_s``: the jar's own time for all jobs (once :meth:`wait` returned).
    """

    def __init__(self, scorer: MeteorScorer, jobs: Sequence[tuple[Sequence[str], Sequence[str]]]) -> None:
        self._results: dict[tuple, object] = {}
        self._done = threading.Condition()
        self.elapsed_s = 0.0
        self._thread = threading.Thread(target=self._run, args=(scorer, [(list(r), list(h)) for r, h in jobs]),
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _key(references: Sequence[str], hypotheses: Sequence[str]) -> tuple:
        return tuple(references), tuple(hypotheses)

    def _run(self, scorer: MeteorScorer, jobs: list) -> None:
        t0 = time.perf_counter()
        for refs, hyps in jobs:
            try:
                result: object = scorer.score_pairs(refs, hyps)
            except MeteorUnavailable as e:
                result = e
            except Exception as e:  # reported to the caller of score_pairs, not lost in this thread
                result = MeteorUnavailable(f"METEOR jar scoring failed: {type(e).__name__}: {e}")
            with self._done:
                self._results[self._key(refs, hyps)] = result
                self._done.notify_all()
        self.elapsed_s = time.perf_counter() - t0

    def score_pairs(self, references: Sequence[str], hypotheses: Sequence[str]) -> tuple[float, list[float]]:
        key = self._key(references, hypotheses)
        with self._done:
            while key not in self._results:
                if not self._thread.is_alive():
                    raise MeteorUnavailable("METEOR jar job was not scheduled in the background")
                self._done.wait(timeout=1.0)
            result = self._results[key]
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[return-value]

    def wait(self) -> None:
        self._thread.join()


def open_meteor(java: str | None = None) -> MeteorScorer | MeteorNotRun:
    """A started scorer, or a :class:`MeteorNotRun` carrying why Java/the jar cannot run."""
    try:
        return MeteorScorer(java=java)
    except MeteorUnavailable as e:
        return MeteorNotRun(str(e))


# ---------------------------------------------------------------------------------------------- ROUGE-L
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (Hyyrö's bit-vector algorithm)."""
    n = len(a)
    if n == 0 or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << n) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def rouge_l(reference: str, hypothesis: str, beta: float = 1.2) -> float:
    """pycocoevalcap ``Rouge.calc_score`` for one reference (tokens = split on single spaces)."""
    tr, tc = reference.split(" "), hypothesis.split(" ")
    lcs = lcs_length(tr, tc)
    prec, rec = lcs / len(tc), lcs / len(tr)
    if prec == 0 or rec == 0:
        return 0.0
    return ((1 + beta**2) * prec * rec) / (rec + beta**2 * prec)


# ---------------------------------------------------------------------------------------------- WordNet
class WordNetNotRun:
    """Pass as ``wordnet=`` to report ``METEOR evaluate`` as not run with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def open_wordnet(folder: str | os.PathLike | None = None):
    """NLTK's reader on WordNet 3.0 from ``folder`` (None: Debian's wordnet-base folder), or a
    :class:`WordNetNotRun` saying why it cannot be read."""
    try:
        return hf_evaluate.load_wordnet(folder)
    except hf_evaluate.WordNetUnavailable as e:
        return WordNetNotRun(str(e))


# ---------------------------------------------------------------------------------------------- corpus BLEU
def corpus_bleu_from_stats(stats: np.ndarray) -> np.ndarray:
    """pycocoevalcap's corpus BLEU-1..4 from summed per-pair statistics.

    ``stats``: (..., 10) sums of the ``PYCOCO_BLEU_STATS`` columns (testlen, reflen, guess-1..4,
    correct-1..4); returns (..., 4). The formula of ``BleuScorer.compute_score`` (tiny 1e-15, small 1e-9,
    brevity penalty when testlen < reflen), vectorised so a bootstrap can rebuild the corpus score of every
    resample from the per-pair statistics.
    """
    tiny, small = 1e-15, 1e-9
    stats = np.asarray(stats, dtype=np.float64)
    testlen, reflen = stats[..., 0], stats[..., 1]
    guess, correct = stats[..., 2:6], stats[..., 6:10]
    log_p = np.cumsum(np.log((correct + tiny) / (guess + small)), axis=-1)
    bleus = np.exp(log_p / np.arange(1, 5))
    ratio = (testlen + tiny) / (reflen + small)
    bp = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, 1e-300)), 1.0)
    return bleus * bp[..., None]


def _pycoco_bleu(refs: list[str], hyps: list[str]) -> tuple[list[float], list[list[float]], np.ndarray]:
    """(corpus BLEU-1..4, per-pair BLEU-1..4 lists, per-pair statistics (n, 10)) as ``Bleu(4).compute_score``."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for ref, hyp in zip(refs, hyps):
        scorer += (hyp, [ref])
    corpus, per_pair = scorer.compute_score(option="closest", verbose=0)
    stats = np.array(
        [
            [c["testlen"], min((abs(length - c["testlen"]), length) for length in c["reflen"])[1], *c["guess"],
             *c["correct"]]
            for c in scorer.ctest
        ],
        dtype=np.int64,
    )
    return list(corpus), per_pair, stats


# ---------------------------------------------------------------------------------------------- all metrics
def _metric(value: float, name: str) -> dict:
    return {"value": float(value), "implementation": IMPLEMENTATIONS[name], "averaging": AVERAGING[name]}


def _not_run(name: str, reason: str) -> dict:
    return {
        "value": None,
        "status": "not run",
        "reason": reason,
        "implementation": IMPLEMENTATIONS[name],
        "averaging": AVERAGING[name],
    }


def nlg_scores(
    references: Sequence[str],
    hypotheses: Sequence[str],
    meteor: MeteorScorer | MeteorInBackground | MeteorNotRun | None = None,
    strip_punct: bool = True,
    per_pair: bool = False,
    timings: dict[str, float] | None = None,
    wordnet=None,
) -> dict:
    """All NLG metrics of ``hypotheses`` against ``references`` (paired by index); see the module docstring.

    ``meteor``: a shared :class:`MeteorScorer` (no JVM start here), ``None`` (start one and close it), or a
    :class:`MeteorNotRun` (METEOR reported as not run). ``wordnet``: a reader from :func:`open_wordnet`, a
    :class:`WordNetNotRun`, or None (Debian's WordNet folder is read). With ``per_pair`` the result also
    holds ``"_per_pair": {metric: [scores]}`` for the report-mean metrics and ``"_bleu_stats"`` (the (n, 10)
    pycocoevalcap statistics of the corpus BLEU). ``timings``, when given, accumulates seconds per part.
    """
    clock = time.perf_counter
    timings = {} if timings is None else timings

    def tick(name: str, t0: float) -> None:
        timings[name] = timings.get(name, 0.0) + clock() - t0

    references = ["" if r is None or (isinstance(r, float) and r != r) else str(r) for r in references]
    hypotheses = ["" if h is None or (isinstance(h, float) and h != h) else str(h) for h in hypotheses]
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references vs {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("nlg_scores needs at least one pair")
    refs = [normalize_text(r, strip_punct) for r in references]
    hyps = [normalize_text(h, strip_punct) for h in hypotheses]

    out: dict = {}
    pairs: dict[str, list[float]] = {}
    t0 = clock()
    bleu, bleu_pairs, bleu_stats = _pycoco_bleu(refs, hyps)
    for n in range(4):
        out[f"BLEU-{n + 1}"] = _metric(bleu[n], f"BLEU-{n + 1}")
    for n in range(4):
        key = f"BLEU-{n + 1} report-mean"
        pairs[key] = [float(x) for x in bleu_pairs[n]]
        out[key] = _metric(np.mean(pairs[key]), key)
    tick("bleu", t0)

    t0 = clock()
    for n, scores in hf_evaluate.bleu_per_report(references, hypotheses, 4).items():
        key = f"BLEU-{n} evaluate"
        pairs[key] = scores
        out[key] = _metric(np.mean(scores), key)
    tick("bleu_evaluate", t0)

    t0 = clock()
    key = "METEOR-NLTK report-mean"
    pairs[key] = hf_evaluate.meteor_per_report(refs, hyps, wordnet=None, tokenize=str.split)
    out[key] = _metric(np.mean(pairs[key]), key)
    tick("meteor_nltk", t0)

    t0 = clock()
    wn = open_wordnet() if wordnet is None else wordnet
    if isinstance(wn, WordNetNotRun):
        out["METEOR evaluate"] = {**_not_run("METEOR evaluate", wn.reason), "wordnet": False}
    else:
        pairs["METEOR evaluate"] = hf_evaluate.meteor_per_report(references, hypotheses, wordnet=wn)
        out["METEOR evaluate"] = {**_metric(np.mean(pairs["METEOR evaluate"]), "METEOR evaluate"), "wordnet": True}
    tick("meteor_evaluate", t0)

    t0 = clock()
    pairs["ROUGE-L"] = [rouge_l(r, h) for r, h in zip(refs, hyps)]
    out["ROUGE-L"] = _metric(np.mean(pairs["ROUGE-L"]), "ROUGE-L")
    tick("rouge_l", t0)

    t0 = clock()
    rouge = hf_evaluate.rouge_per_report(references, hypotheses)
    for key, kind in (("ROUGE-1 evaluate", "rouge1"), ("ROUGE-2 evaluate", "rouge2"), ("ROUGE-L evaluate", "rougeL")):
        pairs[key] = rouge[kind]
        out[key] = _metric(np.mean(rouge[kind]), key)
    tick("rouge_evaluate", t0)

    t0 = clock()
    from pycocoevalcap.cider.cider import Cider

    _, cider_pairs = Cider().compute_score({i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    pairs["CIDEr-D"] = [float(x) for x in cider_pairs]
    out["CIDEr-D"] = _metric(np.mean(pairs["CIDEr-D"]), "CIDEr-D")
    tick("cider", t0)
    # the jar last: a MeteorInBackground has had every other metric's time to finish this job
    t0 = clock()
    own = meteor is None
    scorer = open_meteor() if own else meteor
    try:
        if isinstance(scorer, MeteorNotRun):
            reason = scorer.reason
        else:
            try:
                corpus, met_pairs = scorer.score_pairs(refs, hyps)
                reason = None
            except MeteorUnavailable as e:
                reason = str(e)
    finally:
        if own and isinstance(scorer, MeteorScorer):
            scorer.close()
    if reason is None:
        out["METEOR"] = _metric(corpus, "METEOR")
        pairs["METEOR report-mean"] = met_pairs
        out["METEOR report-mean"] = _metric(np.mean(met_pairs), "METEOR report-mean")
    else:
        out["METEOR"] = _not_run("METEOR", reason)
        out["METEOR report-mean"] = _not_run("METEOR report-mean", reason)
    tick("meteor_jar", t0)

    out = {key: out[key] for key in METRIC_KEYS}  # the documented order, whatever the computing order
    if per_pair:
        out["_per_pair"] = {key: pairs[key] for key in PER_REPORT_KEYS if key in pairs}
        out["_bleu_stats"] = bleu_stats
    return out
