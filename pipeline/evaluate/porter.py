"""Porter stemmer, NLTK flavour (``nltk.stem.PorterStemmer()`` default mode ``NLTK_EXTENSIONS``).

Written here so that the NLTK-style METEOR (:mod:`pipeline.evaluate.meteor_nltk`) runs without NLTK. It
follows M. F. Porter (1980), "An algorithm for suffix stripping", with the departures NLTK makes in its
default mode: a small table of irregular forms (sky/skies, dying, lying, tying, news, innings, outings,
cannings, howe, proceed, exceed, succeed); words of one or two letters are left alone; "ies"/"ied" on
four-letter words keep "ie" (dies -> die); step 1c turns y into i only after a consonant of a stem longer
than one letter; "alli" is handled before the rest of step 2 and "fulli"/"logi" rules are added; the
*o test also accepts a two-letter vowel-consonant stem. ``tests/test_evaluate_nlg.py`` compares it word by
word with NLTK's stemmer on the vocabulary of the 800 CT-RATE reports when NLTK is importable.
"""

from __future__ import annotations

from functools import lru_cache

_VOWELS = frozenset("aeiou")

_IRREGULAR: dict[str, str] = {
    form: base
    for base, forms in {
        "sky": ["sky", "skies"],
        "die": ["dying"],
        "lie": ["lying"],
        "tie": ["tying"],
        "news": ["news"],
        "inning": ["innings", "inning"],
        "outing": ["outings", "outing"],
        "canning": ["cannings", "canning"],
        "howe": ["howe"],
        "proceed": ["proceed"],
        "exceed": ["exceed"],
        "succeed": ["succeed"],
    }.items()
    for form in forms
}


def _cons(w: str, i: int) -> bool:
    """Is w[i] a consonant? 'y' is a consonant at the start or after a vowel."""
    c = w[i]
    if c in _VOWELS:
        return False
    if c == "y":
        return True if i == 0 else not _cons(w, i - 1)
    return True


def _measure(stem: str) -> int:
    """m in [C](VC)^m[V]: the number of vowel-consonant transitions."""
    seq = "".join("c" if _cons(stem, i) else "v" for i in range(len(stem)))
    return seq.count("vc")


def _has_vowel(stem: str) -> bool:
    return any(not _cons(stem, i) for i in range(len(stem)))


def _double_cons(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _cons(w, len(w) - 1)


def _cvc(w: str) -> bool:
    if len(w) >= 3 and _cons(w, len(w) - 3) and not _cons(w, len(w) - 2) and _cons(w, len(w) - 1):
        return w[-1] not in "wxy"
    return len(w) == 2 and not _cons(w, 0) and _cons(w, 1)


def _m_pos(stem: str) -> bool:
    return _measure(stem) > 0


def _m_gt1(stem: str) -> bool:
    return _measure(stem) > 1


def _rules(word: str, rules) -> str:
    """Apply the first rule whose suffix matches; if its condition fails, stop (no later rule is tried)."""
    for suffix, repl, cond in rules:
        if suffix == "*d":
            if _double_cons(word):
                stem = word[:-2]
                return stem + repl if cond is None or cond(stem) else word
            continue
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)] if suffix else word
            return stem + repl if cond is None or cond(stem) else word
    return word


def _step1a(w: str) -> str:
    if w.endswith("ies") and len(w) == 4:
        return w[:-3] + "ie"
    return _rules(w, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])


def _step1b(w: str) -> str:
    if w.endswith("ied"):
        return w[:-3] + ("ie" if len(w) == 4 else "i")
    if w.endswith("eed"):
        stem = w[:-3]
        return stem + "ee" if _measure(stem) > 0 else w
    for suffix in ("ed", "ing"):
        if w.endswith(suffix):
            stem = w[: -len(suffix)]
            if _has_vowel(stem):
                break
    else:
        return w
    last = stem[-1] if stem else ""
    return _rules(
        stem,
        [
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
            ("*d", last, lambda s: last not in ("l", "s", "z")),
            ("", "e", lambda s: _measure(s) == 1 and _cvc(s)),
        ],
    )


def _step1c(w: str) -> str:
    return _rules(w, [("y", "i", lambda s: len(s) > 1 and _cons(s, len(s) - 1))])


def _step2(w: str) -> str:
    if w.endswith("alli") and _m_pos(w[:-4]):
        return _step2(w[:-4] + "al")
    rules = [
        ("ational", "ate", _m_pos),
        ("tional", "tion", _m_pos),
        ("enci", "ence", _m_pos),
        ("anci", "ance", _m_pos),
        ("izer", "ize", _m_pos),
        ("bli", "ble", _m_pos),
        ("alli", "al", _m_pos),
        ("entli", "ent", _m_pos),
        ("eli", "e", _m_pos),
        ("ousli", "ous", _m_pos),
        ("ization", "ize", _m_pos),
        ("ation", "ate", _m_pos),
        ("ator", "ate", _m_pos),
        ("alism", "al", _m_pos),
        ("iveness", "ive", _m_pos),
        ("fulness", "ful", _m_pos),
        ("ousness", "ous", _m_pos),
        ("aliti", "al", _m_pos),
        ("iviti", "ive", _m_pos),
        ("biliti", "ble", _m_pos),
        ("fulli", "ful", _m_pos),
        # the 'l' of 'logi' stays with the stem, so that short stems (geo-, theo-) qualify
        ("logi", "log", lambda s: _m_pos(w[:-3])),
    ]
    return _rules(w, rules)


def _step3(w: str) -> str:
    return _rules(
        w,
        [
            ("icate", "ic", _m_pos),
            ("ative", "", _m_pos),
            ("alize", "al", _m_pos),
            ("iciti", "ic", _m_pos),
            ("ical", "ic", _m_pos),
            ("ful", "", _m_pos),
            ("ness", "", _m_pos),
        ],
    )


def _step4(w: str) -> str:
    rules = [(s, "", _m_gt1) for s in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent")]
    rules.append(("ion", "", lambda s: _measure(s) > 1 and s[-1:] in ("s", "t")))
    rules += [(s, "", _m_gt1) for s in ("ou", "ism", "ate", "iti", "ous", "ive", "ize")]
    return _rules(w, rules)


def _step5a(w: str) -> str:
    if w.endswith("e"):
        stem = w[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _cvc(stem)):
            return stem
    return w


def _step5b(w: str) -> str:
    return _rules(w, [("ll", "l", lambda s: _measure(w[:-1]) > 1)])


@lru_cache(maxsize=200_000)
def stem(word: str) -> str:
    """The NLTK-mode Porter stem of ``word`` (lower-cased first)."""
    w = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[w]
    if len(word) <= 2:
        return w
    for step in (_step1a, _step1b, _step1c, _step2, _step3, _step4, _step5a, _step5b):
        w = step(w)
    return w
