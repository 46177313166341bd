"""Free-text report -> the six region texts: a sentence -> region classifier for CT report language.

Used where no grounded (RadGenome) region sentences exist: the reports stage for volumes without them
(``pipeline.reports`` imports it), and the evaluation for predictions that come as one merged report.

Rules, in order, for each sentence:
  1. **organ terms, then finding terms** (``ORGAN``, ``FINDING``): the region of the term of the first tier
     present that occurs *first* in the sentence
     (CT report sentences name their subject first: "Pericardial effusion was not observed" is about the
     pericardium even though effusion is usually pleural); at equal start the longer term wins
     ("mediastinal main vascular structures" -> heart, "mediastinal lymph node" -> mediastinum);
  2. **context**: a sentence without such a term ("Lumens are clear.", "Follow-up is recommended.")
     continues the topic of the previous sentence; at the start of a report it takes the next assigned
     sentence's region;
  3. **default**: a report in which no sentence names any anatomy puts everything in ``lung``.

So every sentence with a letter in it lands in exactly one region (fragments such as "." are dropped).
The regions follow ``config/regions.yaml`` ``report_regions``: pleura -> lung; trachea and bronchi ->
airways; mediastinum, esophagus, thyroid, thymus, lymph nodes, hiatal hernia -> mediastinum; heart,
pericardium, aorta and great vessels, coronary arteries, valves, vascular devices -> heart; bones, joints,
breast, chest wall soft tissue -> osseous; organs below the diaphragm -> abdomen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.constants import REGIONS

_F = re.IGNORECASE

# (region, pattern): ORGAN terms name anatomy; FINDING terms name findings or generic structures and decide
# only when the sentence names no organ ("Parenchymal density of the spleen" -> abdomen, "Millimetric nodules
# are observed." -> lung). Order does not matter: the earliest (then longest) match of a tier decides.
ORGAN: list[tuple[str, str]] = [
    ("heart", r"\bheart\b|\bcardi\w*|\bpericardi\w*|\bcoronar\w*|\baort\w*|\bvalv\w*|\bmitral\b|\btricuspid\b"),
    ("heart", r"\bventric\w*|\batri(?:um|al|a)\b|\bCTR\b|\bvena cava\b|\bSVC\b|\bIVC\b|\bgreat (?:vessels?|arter\w*)"),
    ("heart", r"\bpulmonary (?:arter\w*|trunk|veins?|vascular\w*|embol\w*|thromboembol\w*)"),
    ("heart", r"\bmediastinal (?:main )?vascular (?:structures?|calibrations?)|\bbrachiocephalic\b|\bsubclavian\b"),
    ("heart", r"\bcarotid\b|\bjugular\b|\btruncus\b|\bpace ?maker\w*|\bCABG\b"),
    ("airways", r"\btrache\w*|\bbronch(?:us|i|ial)?\b|\bmain bronch\w*|\bairways?\b|\bcarina\w*|\bendobronch\w*"),
    ("lung", r"\blungs?\b|\bpulmonary\b|\bpleura\w*|\bfissur\w*|\bcostophrenic\b|\bhemithora\w*|\bsubpleural\b"),
    ("lung", r"\bperibronch\w*|\bpneumothora\w*|\bpleuroparenchym\w*|\bperihilar\b|\blingul\w*"),
    ("mediastinum", r"\bmediastin\w*|\blymph\w*|\bLAPs?\b|\bLAMs?\b|\badenopath\w*|\besophag\w*|\boesophag\w*"),
    ("mediastinum", r"\bthyroid\w*|\bthym\w*|\bhiat(?:al|us)\b|\bgoit(?:er|re)\b|\bprevascular\b|\bparatracheal\b"),
    ("mediastinum", r"\bsubcarinal\b|\bhil(?:ar|um|i)\b|\baortopulmonary\b|\bparaesophageal\b"),
    ("osseous", r"\bbones?\b|\bbony\b|\bosseous\b|\bosteo\w*|\bvertebr\w*|\bspin(?:e|al)\b|\bspondyl\w*|\bribs?\b"),
    ("osseous", r"\bstern(?:um|al|otomy)\b|\bclavic\w*|\bscapul\w*|\bhumer\w*|\bkyphos\w*|\bscolio\w*|\blordos\w*"),
    ("osseous", r"\bdiscs?\b|\bdisk\b|\bintervertebral\b|\bneural foramin\w*|\bjoints?\b|\bcostochondral\b"),
    ("osseous", r"\bcostovertebral\b|\bbreasts?\b|\bmammar\w*|\bgynecomast\w*|\baxill\w*|\bchest wall\b"),
    ("osseous", r"\bsubcutaneous\b|\bmuscles?\b|\bskin\b|\bcorpus heights?\b|\bschmorl\w*"),
    ("abdomen", r"\babdom\w*|\bliver\b|\bhepat\w*|\bspleen\b|\bsplen\w*|\bkidneys?\b|\brenal\b|\badrenal\w*"),
    ("abdomen", r"\bgall ?bladder\b|\bcholecyst\w*|\bbiliary\b|\bpancrea\w*|\bstomach\b|\bgastr\w*|\bbowel\b|\bcolon\b"),
    ("abdomen", r"\bintestin\w*|\bmesenter\w*|\bceliac\b|\bportal\b|\bperitone\w*|\bretroperitone\w*|\bascites\b"),
    ("abdomen", r"\buter\w*|\bovar\w*|\badnex\w*|\bvagin\w*|\bprostat\w*|\binguinal\b|\bpelvi\w*|\bbladder\b"),
    ("abdomen", r"\bduoden\w*|\bcaudate\b|\bperihepatic\b|\bperisplenic\b|\bperirenal\b|\bpostrenal\b|\bumbilical\b"),
]
FINDING: list[tuple[str, str]] = [
    ("heart", r"\bvascular\b|\bvessels?\b|\barter(?:y|ies|ial)\b|\batherom\w*|\batheroscl\w*|\bplaques?\b"),
    ("heart", r"\bcatheter\w*|\bstent\w*|\bby-?pass\b|\bvenous\b|\bveins?\b|\bembol\w*|\bdissection\b|\baneurysm\w*"),
    ("lung", r"\bparenchym\w*|\blob(?:e|es|ar|ul\w*)\b|\bsegments?\b|\bapex\b|\bapical\b|\bapices\b|\bbasal\b"),
    ("lung", r"\bnodul\w*|\bmicronodul\w*|\bemphysem\w*|\bbull(?:a|ae|ous)\b|\bblebs?\b|\bconsolidat\w*|\batelecta\w*"),
    ("lung", r"\bground[- ]?glass\w*|\bfrosted glass\b|\bopacit\w*|\binfiltrat\w*|\bpneumoni\w*|\bcovid\w*|\bviral\b"),
    ("lung", r"\beffusions?\b|\bfibro\w*|\bsequel\w*|\bbronchiect\w*|\binterstiti\w*|\bsept(?:a|al|um)\b|\bmosaic\w*"),
    ("lung", r"\balveol\w*|\baeration\b|\btree[- ]in[- ]bud\b|\bbud\w*|\bcrazy[- ]paving\b|\bhoneycomb\w*|\bdensit\w*"),
    ("lung", r"\bbands?\b|\bscar\w*|\bair trapping\b|\bcavit\w*"),
    ("osseous", r"\blytic\b|\bblastic\b|\bsclerotic\b|\bfractur\w*|\bsoft tissues?\b|\bdegenerative\b"),
    ("abdomen", r"\bdiaphragm\w*|\bcysts?\b"),
]
TERMS: list[tuple[str, str]] = ORGAN + FINDING
_TIERS: list[list[tuple[str, re.Pattern[str]]]] = [[(r, re.compile(p, _F)) for r, p in tier] for tier in (ORGAN, FINDING)]
DEFAULT_REGION = "lung"
assert {r for r, _ in TERMS} == set(REGIONS) and DEFAULT_REGION in REGIONS

_SPLIT = re.compile(r"(?<=[.!?])\s+|[\r\n]+|\"+|“|”|\|\|\|")
_LETTER = re.compile(r"[A-Za-z]")


def split_sentences(text: str | None) -> list[str]:
    """Sentences of a free-text report: split after . ! ? and at newlines, quotes and ``|||``; fragments
    without a letter are dropped."""
    return [s.strip() for s in _SPLIT.split(text or "") if s and _LETTER.search(s)]


def classify_sentence(sentence: str) -> str | None:
    """The region whose organ term occurs first in ``sentence`` (longest at equal start); without one, the
    same over finding terms; None if neither occurs."""
    for tier in _TIERS:
        best: tuple[int, int, str] | None = None
        for region, pat in tier:
            m = pat.search(sentence)
            if m is None:
                continue
            key = (m.start(), -(m.end() - m.start()), region)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is not None:
            return best[2]
    return None


def assign_regions(sentences: Sequence[str]) -> list[tuple[str, str]]:
    """(region, how) for every sentence of one report; how = term | context | default (see module doc)."""
    direct = [classify_sentence(s) for s in sentences]
    out: list[tuple[str, str]] = []
    first = next((r for r in direct if r is not None), None)
    current = first
    for r in direct:
        if r is not None:
            current = r
            out.append((r, "term"))
        elif current is not None:
            out.append((current, "context"))
        else:
            out.append((DEFAULT_REGION, "default"))
    return out


def split_report(text: str | None) -> dict[str, str]:
    """The six region texts of a free-text report (sentences in report order, joined by a space)."""
    parts: dict[str, list[str]] = {r: [] for r in REGIONS}
    sentences = split_sentences(text)
    for sentence, (region, _) in zip(sentences, assign_regions(sentences)):
        parts[region].append(sentence)
    return {r: " ".join(s) for r, s in parts.items()}
