"""Rule-based 18-class CT abnormality labeler (CT-RATE classes).

A report is split into sentences and then into clauses; each class has a set of synonym regexes written
for CT-RATE report language (translated Turkish radiology English: "millimetric nodules", "atelectatic
changes", "calcific atheroma plaques in the aorta", "pericardial effusion-thickening was not observed",
...). A mention counts when it is not inside a negation scope; a class is positive (1) for a report when
at least one mention of it is affirmed. Uncertain mentions ("... cannot be excluded", "(nodule?)") count as
positive, as in CT-RATE's labels.

Negation is resolved inside the clause that holds the mention:
  * a pre-cue ("no", "not", "without", "no evidence of", "free of", ...) before the mention and with no
    scope breaker ("but", "however", "although", ...) in between;
  * a post-cue after the mention ("... was not observed", "... not seen", "... are open",
    "... within normal limits", "... disappeared", ...);
  * a "not" that is part of an earlier completed post-negation ("X is not observed, Y is present") does
    not negate later mentions; "cannot be excluded / ruled out" keeps mentions positive;
  * both-sides phrasing: "No effusion on the right, minimal effusion on the left" - a mention placed, after a
    comma, on the other side than the negated part is outside the negation; "bilateral" / "on both sides"
    / "in either lung" only locate a mention (negated or not by the rest of the clause);
  * uncertainty: hedged mentions ("possible", "suspicious for", "probable", "may be compatible with",
    "X?", "X versus Y") count as positive like CT-RATE's labels; "unlikely" and "no longer seen",
    "resolution of" negate.
Class-specific exclusions drop mentions that name the wrong organ (e.g. a thyroid nodule is not a lung
nodule, a pericardial effusion is not a pleural one).

Class conventions follow CT-RATE's human labels (checked on 800 labelled reports):
  * Lymphadenopathy: any affirmed lymph node mention of the chest, even "millimetric" or "that did not
    reach pathological size", except intrapulmonary / subpleural / fissural nodes;
  * Lung opacity: ground glass (also "frosted glass", "crazy paving") and density increases not explained
    as sequelae / atelectasis / bands / nodules / consolidation; consolidation has its own class;
  * Lung nodule: "nodule(s)", "nodular lesion", "micronodules"; "nodular" as an adjective of
    consolidation / ground glass / infiltrate / calcification is not a nodule;
  * fibroatelectasis / fibroatelectatic changes count as Pulmonary fibrotic sequela, not Atelectasis;
  * Arterial wall calcification: atheroma / calcified plaques / wall calcification of the aorta and other
    arteries; a clause naming only coronary arteries (or LAD/RCA/...) or only a valve does not count;
  * Peribronchial thickening: "peribronchial ..." thickening (plain "bronchial wall thickening" is mostly
    labelled 0).

The labeler is deterministic, has no dependencies beyond `re`/numpy, and is the one used for CA-F1 on both
reference and generated text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.constants import CTRATE_CLASSES

CLASSES: tuple[str, ...] = CTRATE_CLASSES

# Named wherever labels feed a score (metrics.json "implementations").
IMPLEMENTATION = "pipeline.evaluate.labeler rule-based v2 (regex synonyms + clause negation, uncertainty, sides)"

_F = re.IGNORECASE


def _rx(*parts: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in parts), _F)


# ----------------------------------------------------------------------------------------------------
# Per-class mention patterns. Each matches a phrase that *names* the finding; negation is handled apart.
# ----------------------------------------------------------------------------------------------------
_DEVICE = (
    r"\bstents?\b|\bstented\b|\bcatheters?\b|\bcatheteri[sz]ation\b|\bpace ?makers?\b|\bpacing\b|"
    r"\bICD\b|\bdefibrillator|\bprosthe(?:sis|ses|tic)\b|\bclips?\b|\bsutures?\b|\bsuture materials?\b|"
    r"\bsternotomy wires?\b|\bcerclage|\bwires?\b|\bport\b|\bport[- ]cath|\bportacath|"
    r"\b(?:nasogastric|endotracheal|tracheostomy|chest|thoracostomy|feeding|gastrostomy|drainage|"
    r"nephrostomy|ng|et)\s+tubes?\b|\btracheostomy\b|\btracheostomy cannula|\bcannula\b|"
    r"\bdrains?\b|\bdrainage catheter|\bbreast implants?\b|\bimplanted\b|\bscrews?\b|"
    r"\bplates?\b(?<!end plate)(?<!end-plate)(?<!end plates)(?<!end-plates)(?<!anterior plate)"
    r"(?<!superior plate)(?<!inferior plate)(?! ?-?like)|\bPEG\b|"
    r"\bfixation\b|\bfixator|\bgrafts?\b|\bvalve replacement|\bprosthetic valve|\bmetallic\b|"
    r"\bcoils?\b|\bembolization material|\bfilter\b|\bshunt\b|\boperation materials?\b|"
    r"\bsurgical materials?\b|\bmedical materials?\b|\bforeign body|\bstaples?\b|\bbypass\b|\bcabg\b|"
    r"\bvertebroplasty|\bkyphoplasty|\bcement\b|\belectrodes?\b|\bleads?\b(?= (?:of|in|extend))|"
    r"\bexpander|\bmammary implant|\bbreast implant|\bclip material|\bmesh\b|\bendoprosthe"
)

# "thickening" and its literal translations in CT-RATE ("thickness increases", "clarification" = prominence)
_THICK = (
    r"(?:thicken\w*|thickness increases?|increases? in (?:the )?thickness|increased thickness|"
    r"(?:mild |slight |minimal )?increases? in thickness|"
    r"thickness increments?|clarifications?|prominen\w*)"
)

PATTERNS: dict[str, re.Pattern[str]] = {
    "Medical material": _rx(_DEVICE),
    "Arterial wall calcification": _rx(
        r"\batheroma(?:tous)?\b",
        r"\batheroscleros[ie]s\b|\batherosclerotic\b",
        r"\bcalcified plaques?\b|\bcalcific plaques?\b|\bcalcific atheroma",
        r"\b(?:aort\w*|vascular|arterial|vessel\w*|carotid|iliac|mural|intimal)\b[\w\s,-]{0,30}?\bcalcifi\w*",
        r"\bcalcifi\w*[\w\s,-]{0,40}?\b(?:aort\w*|vascular|arterial|arteries|artery|vessel\w*|"
        r"wall|walls|carotid|iliac|subclavian|brachiocephalic)\b",
        r"\bplaques?\b",
    ),
    "Cardiomegaly": _rx(
        r"\bcardiomegal\w*",
        r"\bcardiac enlargement|\benlarge\w* (?:of the )?(?:heart|cardiac)",
        r"\bheart (?:size|dimensions?|volume|contours?)?\s*(?:was |were |is |are )?(?:increased|enlarged|"
        r"larger than normal|(?:slightly|mildly|minimally|significantly|markedly)\s+(?:increased|enlarged))",
        r"\b(?:increased|enlarged|large) (?:heart|cardiac)(?: size| dimensions?| silhouette)?\b",
        r"\bheart\b[\w\s,-]{0,25}\b(?:increased|enlarged)\b",
        r"\b(?:cardiothoracic|cardio-thoracic) (?:ratio|index)\b[\w\s]{0,20}\bincrease\w*",
        r"\bincrease\w* (?:in )?(?:the )?(?:cardiothoracic|cardio-thoracic) (?:ratio|index)",
        r"\bCTR\b[\w\s]{0,15}\bincrease\w*|\bincrease\w* (?:in )?(?:the )?CTR\b",
        r"\bincrease\w* in (?:the )?(?:heart|cardiac) (?:size|dimensions?|volume)",
        r"\b(?:heart|cardiac) (?:sizes?|dimensions?) (?:have |has |had )?(?:increased|enlarged)",
    ),
    "Pericardial effusion": _rx(
        r"\bpericardial (?:effusion|fluid|thickening)",
        r"\bpericardial effusion[- ]thickening",
        r"\b(?:effusion|fluid)\b[\w\s,-]{0,70}?\bpericardi\w*",
        r"\bpericardi\w*\b[\w\s,-]{0,20}\b(?:effusion|fluid)\b",
        r"\bhydropericardium\b|\bpericarditis\b",
    ),
    "Coronary artery wall calcification": _rx(
        r"\bcoronar\w*\b[\w\s,\-–]{0,90}?\b(?:calcifi\w*|atheroma\w*|plaques?|atherosclero\w*)",
        r"\b(?:calcifi\w*|atheroma\w*|plaques?|atherosclero\w*)\b[\w\s,\-–]{0,90}?\bcoronar\w*",
        r"\b(?:LAD|RCA|LCX|Cx|circumflex|left main|left anterior descending)\b[\w\s,\-–]{0,40}?"
        r"(?:calcifi\w*|atheroma\w*|plaques?|atherosclero\w*)",
        r"\b(?:calcifi\w*|atheroma\w*|plaques?|atherosclero\w*)\b[\w\s,\-–]{0,60}?"
        r"\b(?:LAD|RCA|LCX|circumflex|left main|left anterior descending)\b",
    ),
    "Hiatal hernia": _rx(
        r"\bhiat(?:al|us)\s+hernia\w*",
        r"\bhernia\w*\b[\w\s,-]{0,40}\bhiatus\b",
        r"\bhiatus\b[\w\s,-]{0,30}\bhernia\w*",
        r"\bparaesophageal hernia|\bsliding hernia",
    ),
    "Lymphadenopathy": _rx(
        r"\blymphadenopath\w*",
        r"\bLAPs?\b",
        r"\bLAMs?\b",
        r"\badenopath\w*",
        # CT-RATE's human labels mark any affirmed lymph node mention (even "millimetric", "that did
        # not reach pathological size"): the class behaves as "lymph node(s) reported".
        r"\blymph ?nodes?\b(?! stations?)|\blymph ?nodules?\b|\blymphatic nodes?\b",
        r"\b(?:hilar|mediastinal|paratracheal|subcarinal|axillary|prevascular|aortopulmonary|"
        r"supraclavicular|precarinal|paraaortic|paraesophageal|cardiophrenic)\s+(?:\w+\s+)?nodes?\b"
        r"(?! stations?)",
    ),
    "Emphysema": _rx(
        r"\bemphysema\w*",
        r"\bbullae\b|\bbulla\b|\bbullous\b|\bblebs?\b",
    ),
    # "fibroatelectasis/fibroatelectatic" is labelled as a fibrotic sequela, not atelectasis
    "Atelectasis": _rx(
        r"(?<!fibro)(?<!fibro-)\batelecta\w*",
        r"(?<!fibro)(?<!fibro-)(?<=\w)atelecta\w*(?<!fibroatelecta)",
        r"\bcollapsed? (?:lung|lobe|segment)",
        r"\b(?:lung|lobe|lobar|segmental) collapse",
    ),
    # "nodular" as an adjective of consolidation / ground glass / infiltrate / calcification is not a nodule
    "Lung nodule": _rx(
        r"(?<!\bpleural )(?<!schmorl )(?<!schmorl's )\bnodules?\b",
        r"\bmicro-?nodul\w*",
        r"\bmillimetric nodul\w*",
        r"\bnodular (?:lesions?|formations?|structures?|images?|appearances?|foci|focus|shadows?)\b",
        r"\bnodule-like\b|\bnodular-like lesion",
        r"\bmass lesions? in the lung|\bpulmonary mass|\blung mass",
    ),
    "Lung opacity": _rx(
        r"\b(?:ground|frosted|frozen)[- ]?glass\w*(?![- ]?(?:like )?(?:density )?(?:opacity )?nodul)",
        r"\bicy density(?! nodul)|\bcrazy[- ]paving",
    ),
    "Pulmonary fibrotic sequela": _rx(
        r"\bsequela\w*",
        r"\bfibro(?:tic|sis)\b|\bfibro-?atelecta\w*|\bfibrous\b",
        r"\bscar\w*",
        r"\b(?:parenchymal|fibrotic|linear|pleuroparenchymal|pleural[- ]parenchymal) bands?\b|\bband-like\b",
    ),
    "Pleural effusion": _rx(
        r"\bpleural effusion\w*",
        r"\bpleural fluid",
        r"\bhydro(?:pneumo|pno(?:mo|u?mo))?thorax\b",
        r"\b(?:fluid|effusion)\b[\w\s,-]{0,40}\b(?:pleural (?:space|cavity|cavities|spaces)|hemithora\w*)",
        r"\bempyema\b",
    ),
    "Mosaic attenuation pattern": _rx(
        r"\bmosaic\w*",
    ),
    # CT-RATE labels "peribronchial ..." thickening; plain "bronchial wall thickening" is mostly labelled 0
    "Peribronchial thickening": _rx(
        rf"\bperibronch\w*(?: and peribronchovascular| and bronchial)?"
        rf"(?: wall| walls| interstitial| interstitium| interstitial tissue| areas?| vascular)?\s+{_THICK}",
        rf"\bperibronch\w*[\w\s-]{{0,30}}?{_THICK}",
        r"\bincrease in peribronch\w* (?:density|thickness)",
        rf"\b{_THICK} (?:of |in )?(?:the )?peribronch\w*(?: walls?| interstiti\w*| sheath)?",
        rf"\bperibronchovascular (?:interstitial )?{_THICK}",
        r"\bperibronchial cuffing",
    ),
    "Consolidation": _rx(
        r"\bconsolidat\w*",
    ),
    "Bronchiectasis": _rx(
        r"\bbronchiectas\w*",
        r"\bbronchiectatic\b",
        r"\bbronchiolectas\w*",
        r"\bbronchial dilat\w*|\bdilat\w* (?:of )?(?:the )?bronch\w*",
    ),
    "Interlobular septal thickening": _rx(
        rf"\b(?:interlobular |interlobar |intralobular |interseptal |intra- and interseptal )?"
        rf"(?:and (?:interlobular |intralobular )?)?(?:septal|septum|septa)\b[\w\s,-]{{0,20}}?{_THICK}",
        rf"\b{_THICK} (?:of |in )?(?:the )?(?:[\w-]+ ){{0,3}}(?:interlobular )?(?:sept\w*|interseptal)",
        rf"\binterlobular[\w\s,-]{{0,30}}?{_THICK}",
        r"\binterseptal thicken\w*",
    ),
}

# Weaker mentions that count only when their clause has none of the listed context words.
WEAK: dict[str, list[tuple[re.Pattern[str], re.Pattern[str]]]] = {
    # a bare "effusion" is pleural unless the clause places it elsewhere
    "Pleural effusion": [
        (
            _rx(r"\beffusions?\b"),
            _rx(
                r"\bpericardi\w*",
                r"\bjoint\b|\barticular\b|\bknee\b|\bshoulder\b|\bperitone\w*|\bascites\b|\babdom\w*|"
                r"\bkidneys?\b|\b(?:peri)?renal\b|\bspleen\b|\bsplenic\b|\bliver\b|\bhepatic\b|"
                r"\bsubcapsular\b|\bpelvi\w*|\bgallbladder\b|\bperihepatic\b|\bperisplenic\b",
            ),
        )
    ],
    "Lung opacity": [
        (
            _rx(
                r"\bdensity increase\w*|\bincreased densit\w*|\bincreases? in (?:the )?density|"
                r"\bdensit\w* increase\w*|\bdependent densit\w*|\bdepandant densit\w*",
            ),
            # density increases explained as scarring / collapse / nodules belong to those classes
            _rx(
                r"\bsequel\w*|\bfibro\w*|\batelecta\w*|\bpleuro-?parenchym\w*|\bpleural parenchym\w*|"
                r"\bbands?\b|\bband-like|\bnodul\w*|\bconsolidat\w*",
                r"\bsoft tissue|\bsubcutaneous|\bfat(?:ty)? (?:tissue|planes?)|\bbone|\bliver|\bkidney|"
                r"\bmesenter|\bbreast|\bsclero|\bvertebra|\bskin\b|\bmetallic|\bsternum|\brib\b|"
                r"\bmediastin|\bpleura\b|\bpleural (?:thick|leaf|leaves)|\bmuscle|\bspleen|\bpancrea",
            ),
        )
    ],
}

# Mentions to drop when the clause/context says the finding belongs elsewhere or is not pathological.
EXCLUDE: dict[str, re.Pattern[str]] = {
    "Medical material": _rx(
        r"\bend ?plates?\b", r"\bplate-?like\b", r"\bplate atelecta", r"\bgrowth plate",
        r"\bpleural plaques?", r"\bbypass\b(?= of)", r"\bcatheter (?:angiography)",
        r"\bport(?:al)? ven", r"\bfilter(?:ed|ing)\b", r"\bvertebra\w*(?!.*\b(?:fixation|screws?)\b)",
    ),
    "Arterial wall calcification": _rx(
        r"\bpleural plaques?\b",
        # only coronary vessels named in the clause -> that is the coronary class, not this one
        r"^(?!.*\b(?:aort\w*|carotid|iliac|subclavian|brachiocephalic|vascular|vessels|arch|"
        r"great arteries|thoracic)\b).*\b(?:coronar\w*|LAD|RCA|LCX|circumflex|left anterior descending)\b",
        # valve calcification is not arterial wall calcification
        r"^(?!.*\b(?:aortic (?:wall|arch)|aorta|arter\w*|vascular|vessel\w*)\b).*\bvalv\w*",
        r"\bpleura\w*",
    ),
    "Lung nodule": _rx(
        r"\bthyroid\b", r"\bgoit(?:er|re)\b", r"\badrenal\b", r"\bliver\b|\bhepatic\b",
        r"\bkidneys?\b|\brenal\b",
        r"\bbreast\b", r"\bspleen\b|\bsplenic\b", r"\blymph nodes?\b(?! ?\?)", r"\bnodular thickening\b",
        r"\bpancrea\w*", r"\bsubcutaneous\b", r"\bhypodense\b", r"\bmediastin\w*", r"\bpericardi(?:al|um)\b",
        r"\bin the pleura\b|\bpleural\b(?! ?-?based| base)", r"\bschmorl", r"\bmesenter\w*", r"\bcolon\b",
        r"\bvertebra\w*", r"\baxilla\w*", r"\bneck\b",
    ),
    "Lymphadenopathy": _rx(r"\bintrapulmonary\b|\bsubpleural\b|\bfissur\w*|\bintraparenchymal\b"),
    "Pulmonary fibrotic sequela": _rx(
        r"\bkidneys?\b|\brenal\b|\bperirenal\b|\bspleen\b|\bsplenic\b|\bliver\b|\bhepatic\b|\brib\b|"
        r"\bribs\b|\bhumer\w*|\bfracture\w*|\bbones?\b|\bvertebra\w*|\bmediastin\w*|\blymph\b|"
        r"\bclavic\w*|\bsternum\b|\bbreast\b|\bthyroid\b|\bpancrea\w*|\bpleura\b(?!\w)",
    ),
    "Emphysema": _rx(
        r"\bsubcutaneous emphysema|\bmediastinal emphysema|\bemphysema in the (?:subcutaneous|soft)"
    ),
}

_RULES: dict[str, list[tuple[re.Pattern[str], re.Pattern[str] | None]]] = {
    cls: [(PATTERNS[cls], None), *WEAK.get(cls, [])] for cls in CLASSES
}

# ----------------------------------------------------------------------------------------------------
# Negation machinery
# ----------------------------------------------------------------------------------------------------
_PRE_NEG = re.compile(
    r"\b(?:no|not|without|neither|nor|none|absence of|absent|free of|negative for|rule out|ruled out|"
    r"no evidence of|no sign of|no signs of|no findings? of|nor was|never|"
    r"(?<!partial )(?<!partially )(?:complete )?(?:resolution|disappearance) of)\b",
    _F,
)
_POST_NEG = re.compile(
    r"\b(?:(?:was|were|is|are|has been|have been|could be|can be)\s+)?not\s+(?:\w+\s+){0,2}?(?:observed|"
    r"detected|seen|identified|present|noted|found|evident|visuali[sz]ed|monitored|determined|"
    r"encountered|demonstrated|shown|revealed|apparent|distinguished|described|considered|"
    r"developed|followed|enlarged)\b|"
    r"\b(?:is|are|was|were)\s+absent\b|\bare open\b|\bis open\b|\bwere open\b|\bwas open\b|"
    r"\bwithin normal limits\b|\bdisappeared\b|\bregressed completely\b|\bresolved\b|"
    r"\bno longer\s+(?:\w+\s+)?(?:observed|seen|detected|present|visible|evident|noted|identified)\b|"
    r"\b(?:is|are|was|were|seems?|appears?)\s+(?:\w+\s+)?unlikely\b",
    _F,
)
# Phrases in which "not" expresses uncertainty, not absence: the mention stays positive.
_UNCERTAIN = re.compile(
    r"\b(?:cannot|can ?not|could not|can't|couldn't)\s+(?:be\s+)?(?:ruled out|excluded|exclude|"
    r"rule out|distinguished|differentiated)\b|\bnot excluded\b|\bnot ruled out\b",
    _F,
)
# Words that close a pre-negation scope.
_BREAK = re.compile(
    r"\b(?:but|however|although|though|whereas|while|except|apart from|other than|besides|yet|"
    r"instead|nevertheless|in addition|also|on the other hand)\b|"
    r",\s*(?:and\s+)?(?:there (?:is|are|was|were)|a|an)\b|"
    r"\b(?:was|were|is|are)\s+(?:observed|detected|seen|noted|present|found|identified)\b"
    r"(?!\s+(?:in|at|on)\b[^,]*\bnot\b)",
    _F,
)

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|[\n\r]+|\|\|\||[\"“”•;]+|\s-\s|(?<=\w):\s")
_CLAUSE_SPLIT = re.compile(
    r"\b(?:but|however|whereas|although|though)\b|,\s*(?:and\s+)?(?:there (?:is|are|was|were)|"
    r"which|in addition|additionally)\b",
    _F,
)


# Relative clauses that talk about an earlier study ("..., which was observed in the previous examination,
# was not detected") would otherwise split a mention from its negation; they are removed first.
_PRIOR_REF = re.compile(
    r",?\s*\b(?:which|that)\s+(?:was|were|had been|has been|have been|is|are)\s+(?:\w+\s+)?"
    r"(?:observed|seen|detected|noted|described|present|reported|identified)\s+(?:in|on|at)\s+"
    r"(?:the\s+)?(?:previous|prior|earlier|former|last|old)\s+(?:\w+\s+)?"
    r"(?:examinations?|exams?|studies|study|ct|imaging|scans?|tomograph\w*)\b,?",
    _F,
)


def split_sentences(text: str) -> list[str]:
    """Sentences of a report: split on '. ', newlines, `|||`, quotes, bullets, ';' and ': '."""
    text = _PRIOR_REF.sub(" ", text or "")
    return [s.strip() for s in _SENT_SPLIT.split(text) if s and s.strip()]


def _clauses(sentence: str) -> list[str]:
    return [c for c in _CLAUSE_SPLIT.split(sentence) if c and c.strip()]


_SIDE = re.compile(r"\b(right|left)\b", _F)


def _side_switch(clause: str, between_start: int, start: int, end: int) -> bool:
    """Both-sides phrasing: "No effusion on the right, minimal effusion on the left" - after a comma the
    mention is placed on the other side than the negated part, so the negation does not reach it."""
    between = clause[between_start:start]
    if "," not in between:
        return False
    head, tail = between.rsplit(",", 1)
    after = clause[end:].split(",", 1)[0][:60]
    sides_head = {x.lower() for x in _SIDE.findall(head)}
    sides_tail = {x.lower() for x in _SIDE.findall(tail + " " + clause[start:end] + " " + after)}
    return bool(sides_head) and bool(sides_tail) and not (sides_head & sides_tail)


def _pre_negated(clause: str, start: int, end: int | None = None) -> bool:
    """True when a negation cue before `start` governs the mention (no scope breaker in between)."""
    before = clause[:start]
    # a "not" that belongs to a completed post-negated predicate ("X is not observed, Y is present")
    # closes that earlier scope; it does not open one for later mentions
    spent = [(m.start(), m.end()) for m in _POST_NEG.finditer(before)]
    cues = [c for c in _PRE_NEG.finditer(before) if not any(a <= c.start() < b for a, b in spent)]
    if not cues:
        return False
    last = cues[-1]
    between = before[last.end():]
    if _BREAK.search(between):
        return False
    if _side_switch(clause, last.end(), start, start if end is None else end):
        return False
    # Long distance between cue and mention weakens the scope (lists are long, though): cap in words.
    if len(between.split()) > 14:
        return False
    return True


def _post_negated(clause: str, end: int) -> bool:
    after = clause[end:]
    m = _POST_NEG.search(after)
    if not m:
        return False
    gap = after[: m.start()]
    # a new affirmed predicate before the post cue ends the mention's scope
    if re.search(r"\b(?:was|were|is|are)\s+(?:observed|detected|seen|noted|present|found)\b", gap, _F):
        return False
    if re.search(r"\b(?:and|with)\s+(?:a|an)\b", gap, _F):
        return False
    return len(gap.split()) <= 18


def _mention_affirmed(clause: str, m: re.Match[str]) -> bool:
    if _UNCERTAIN.search(clause):
        return True
    if _pre_negated(clause, m.start(), m.end()):
        return False
    if _post_negated(clause, m.end()):
        return False
    return True


def label_sentence(sentence: str) -> np.ndarray:
    """18-vector of affirmed classes in one sentence."""
    out = np.zeros(len(CLASSES), dtype=np.int64)
    for clause in _clauses(sentence):
        for k, cls in enumerate(CLASSES):
            if out[k]:
                continue
            excl = EXCLUDE.get(cls)
            for pat, ctx_excl in _RULES[cls]:
                mentions = list(pat.finditer(clause))
                if not mentions:
                    continue
                if excl is not None and excl.search(clause):
                    break
                if ctx_excl is not None and ctx_excl.search(clause):
                    continue
                if any(_mention_affirmed(clause, m) for m in mentions):
                    out[k] = 1
                    break
    return out


def label_report(text: str) -> np.ndarray:
    out = np.zeros(len(CLASSES), dtype=np.int64)
    for s in split_sentences(text):
        out |= label_sentence(s)
    return out


def label_reports(texts: Sequence[str] | Iterable[str]) -> np.ndarray:
    """Label each report: (n, 18) int array of 0/1 in CTRATE_CLASSES order. None/NaN -> all zeros."""
    rows = []
    for t in texts:
        if t is None or (isinstance(t, float) and t != t):
            t = ""
        rows.append(label_report(str(t)))
    if not rows:
        return np.zeros((0, len(CLASSES)), dtype=np.int64)
    return np.stack(rows).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Backends: every labeler has CLASSES, IMPLEMENTATION and label_reports(texts) -> (n, 18) 0/1.
# ----------------------------------------------------------------------------------------------------
BACKENDS: tuple[str, ...] = ("rules", "radbert")


class RuleLabeler:
    """This module's rule labeler behind the backend interface."""

    CLASSES = CLASSES
    IMPLEMENTATION = IMPLEMENTATION

    @staticmethod
    def label_reports(texts: Sequence[str] | Iterable[str]) -> np.ndarray:
        return label_reports(texts)


def load_labeler(
    backend: str = "rules",
    weights: str | None = None,
    model_dir: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
):
    """The labeler for ``backend``: ``rules`` (this module) or ``radbert`` (CT-CLIP's classifier from a local
    ``weights`` file and ``model_dir`` with config + tokenizer; see :mod:`pipeline.evaluate.radbert`)."""
    if backend == "rules":
        return RuleLabeler()
    if backend == "radbert":
        if not weights or not model_dir:
            raise ValueError("labeler backend 'radbert' needs both weights (file) and model_dir (config + tokenizer)")
        from pipeline.evaluate.radbert import RadBertLabeler

        return RadBertLabeler(weights, model_dir, device=device, batch_size=batch_size)
    raise ValueError(f"unknown labeler backend {backend!r}; choose from {BACKENDS}")
