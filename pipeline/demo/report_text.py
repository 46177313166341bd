"""CT-RATE-style report text for a planted case, one sentence list per region.

Every sentence is a (region, RadGenome anatomy path, text) triple; Findings_EN is the sentences in
REGIONS order (lung, airways, mediastinum, heart and vessels, bones, upper abdomen). Each statement has
2-3 phrasings chosen by the case's generator; sizes, sides and lobes are copied from the planted
records, so the text never says more or less than what is in the volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.constants import REGIONS
from pipeline.demo.findings import Finding

LOBE_MASK_NAME: dict[str, str] = {
    "right_upper_lobe": "right lung upper lobe",
    "right_middle_lobe": "right lung middle lobe",
    "right_lower_lobe": "right lung lower lobe",
    "left_upper_lobe": "left lung upper lobe",
    "left_lower_lobe": "left lung lower lobe",
}
LOBE_ALT: dict[str, str] = {
    "right_upper_lobe": "upper lobe of the right lung",
    "right_middle_lobe": "middle lobe of the right lung",
    "right_lower_lobe": "lower lobe of the right lung",
    "left_upper_lobe": "upper lobe of the left lung",
    "left_lower_lobe": "lower lobe of the left lung",
}


def lobe_path(lobe: str) -> str:
    side = lobe.split("_")[0]
    return f"lung/lung/{side} lung/{LOBE_MASK_NAME[lobe]}"


@dataclass
class Sentence:
    region: str        # pipeline.constants.REGIONS
    anatomy: str       # RadGenome anatomy path (top level = RadGenome region)
    text: str


@dataclass
class Report:
    clinical: str
    technique: str
    sentences: list[Sentence]
    impressions: str

    @property
    def findings(self) -> str:
        return " ".join(s.text for s in self.sentences)


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _lobe(rng: np.random.Generator, lobe: str) -> str:
    return _pick(rng, [LOBE_MASK_NAME[lobe], LOBE_ALT[lobe]])


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- one function per finding: (region, anatomy, sentences), impression phrase ---------------------

def _nodule_sentences(f: Finding, rng: np.random.Generator) -> list[Sentence]:
    out = []
    for n in f["nodules"]:
        d, lobe = n["size_mm"], n["lobe"]
        text = _pick(rng, [
            f"A {d} mm nodule is observed in the {LOBE_MASK_NAME[lobe]}.",
            f"A nodule measuring {d} mm was detected in the {LOBE_ALT[lobe]}.",
            f"There is a {d} mm diameter solid nodule in the {_lobe(rng, lobe)}.",
        ])
        out.append(Sentence("lung", lobe_path(lobe), text))
    return out


def _effusion_sentence(f: Finding, rng: np.random.Generator) -> Sentence:
    dep = f["depth_mm"]
    if f["side"] == "bilateral":
        text = _pick(rng, [
            f"Bilateral pleural effusion is observed, reaching {dep['right']} mm on the right and "
            f"{dep['left']} mm on the left.",
            f"Pleural effusion is present in both hemithoraces, measuring {dep['right']} mm on the right and "
            f"{dep['left']} mm on the left at the thickest point.",
        ])
    else:
        sd, d = f["side"], dep[f["side"]]
        text = _pick(rng, [
            f"Pleural effusion reaching {d} mm in thickness is observed on the {sd}.",
            f"A {sd} pleural effusion with a maximum thickness of {d} mm was detected.",
            f"There is {sd}-sided pleural effusion measuring {d} mm in its deepest part.",
        ])
    return Sentence("lung", "pleura", text)


def finding_sentences(f: Finding, rng: np.random.Generator) -> list[Sentence]:
    c = f["class"]
    if c == "Lung nodule":
        return _nodule_sentences(f, rng)
    if c == "Pleural effusion":
        return [_effusion_sentence(f, rng)]
    if c == "Emphysema":
        sev = f["severity"]
        return [Sentence("lung", "lung/lung", _pick(rng, [
            f"{_cap(sev)} emphysematous changes are observed in both lungs, more prominent in the upper "
            "lobes.",
            f"There are {sev} centrilobular emphysematous changes in the upper lobes of both lungs.",
            f"{_cap(sev)} emphysema is present in both lungs with upper lobe predominance.",
        ]))]
    if c in ("Consolidation", "Lung opacity", "Atelectasis"):
        lobe = f["lobe"]
        if c == "Consolidation":
            opts = [f"Consolidation is observed in the {LOBE_MASK_NAME[lobe]}.",
                    f"A consolidation area measuring approximately {f['size_mm']} mm was detected in the "
                    f"{LOBE_ALT[lobe]}.",
                    f"Patchy consolidation is present in the {_lobe(rng, lobe)}."]
        elif c == "Lung opacity":
            opts = [f"Ground glass opacity is observed in the {LOBE_MASK_NAME[lobe]}.",
                    f"An area of ground glass density is present in the {LOBE_ALT[lobe]}.",
                    f"Focal ground-glass opacity was detected in the {_lobe(rng, lobe)}."]
        else:
            opts = [f"Linear atelectasis is observed in the {LOBE_MASK_NAME[lobe]}.",
                    f"Subsegmental atelectatic changes are present in the {LOBE_ALT[lobe]}.",
                    f"Plate-like atelectasis was detected in the {_lobe(rng, lobe)}."]
        return [Sentence("lung", lobe_path(lobe), _pick(rng, opts))]
    if c == "Lymphadenopathy":
        st = _join([n["station"] for n in f["nodes"]])
        d = f["size_mm"]
        region_word = "regions" if len(f["nodes"]) > 1 else "region"
        return [Sentence("mediastinum", "mediastinum", _pick(rng, [
            f"Lymph nodes with a short axis reaching {d} mm are observed in the {st} {region_word}.",
            f"Enlarged lymph nodes are present in the {st} {region_word}, the largest measuring {d} mm in "
            "short axis.",
            f"Lymphadenopathy is observed in the {st} {region_word} (largest {d} mm).",
        ]))]
    if c == "Hiatal hernia":
        return [Sentence("mediastinum", "esophagus", _pick(rng, [
            "A sliding hiatal hernia is observed at the lower end of the esophagus.",
            "There is a hiatal hernia at the esophagogastric junction.",
            "Hiatal hernia is present at the distal esophagus.",
        ]))]
    if c == "Cardiomegaly":
        return [Sentence("heart", "heart", _pick(rng, [
            "The heart is enlarged (cardiomegaly).",
            "Heart size is increased; the cardiothoracic index is increased in favour of the heart.",
            "Cardiomegaly is present.",
        ]))]
    if c == "Pericardial effusion":
        t = f["thickness_mm"]
        return [Sentence("heart", "heart", _pick(rng, [
            f"Pericardial effusion reaching {t} mm in thickness is observed.",
            f"A pericardial effusion with a maximum thickness of {t} mm was detected around the heart.",
            f"There is pericardial fluid measuring {t} mm in thickness.",
        ]))]
    if c == "Arterial wall calcification":
        return [Sentence("heart", "heart", _pick(rng, [
            "Calcific atheroma plaques are observed in the walls of the thoracic aorta.",
            "Atherosclerotic wall calcifications are present in the aortic arch and descending aorta.",
            "There are calcified atheromatous plaques in the aortic wall.",
        ]))]
    if c == "Coronary artery wall calcification":
        return [Sentence("heart", "heart", _pick(rng, [
            "Calcification is observed in the coronary arteries.",
            "Coronary artery wall calcifications are noted.",
            "There are calcific plaques in the coronary artery walls.",
        ]))]
    if c == "Kidney cyst":
        sd, d = f["side"], f["size_mm"]
        return [Sentence("abdomen", f"abdomen/abdomen/kidney/{sd} kidney", _pick(rng, [
            f"A {d} mm simple cyst is observed in the {sd} kidney.",
            f"A cortical cyst measuring {d} mm was detected in the {sd} kidney.",
            f"There is a {d} mm hypodense cystic lesion in the {sd} kidney.",
        ]))]
    raise ValueError(f"no sentence template for finding {c!r}")


def impression_phrase(f: Finding) -> str:
    c = f["class"]
    if c == "Lung nodule":
        return "; ".join(f"{n['size_mm']} mm nodule in the {LOBE_MASK_NAME[n['lobe']]}" for n in f["nodules"])
    if c == "Pleural effusion":
        if f["side"] == "bilateral":
            return "Bilateral pleural effusion"
        return f"{_cap(f['side'])} pleural effusion"
    if c in ("Consolidation", "Lung opacity", "Atelectasis"):
        word = {"Consolidation": "Consolidation", "Lung opacity": "Ground glass opacity",
                "Atelectasis": "Linear atelectasis"}[c]
        return f"{word} in the {LOBE_MASK_NAME[f['lobe']]}"
    if c == "Kidney cyst":
        return f"{_cap(f['side'])} renal cyst"
    return {
        "Emphysema": "Emphysema",
        "Lymphadenopathy": "Mediastinal lymphadenopathy",
        "Hiatal hernia": "Hiatal hernia",
        "Cardiomegaly": "Cardiomegaly",
        "Pericardial effusion": "Pericardial effusion",
        "Arterial wall calcification": "Atherosclerotic calcification of the aorta",
        "Coronary artery wall calcification": "Coronary artery calcification",
    }[c]


# ---- normal statements --------------------------------------------------------------------------

_NORMAL: dict[str, list[str]] = {
    "lung": [
        "Aeration of both lungs is normal and no nodular or infiltrative lesion was detected in the lung "
        "parenchyma.",
        "When examined in the lung parenchyma window, no nodule, consolidation or ground glass opacity was "
        "observed.",
        "Both lungs are normally aerated without focal nodule or infiltrate.",
    ],
    "pleura": [
        "Pleural effusion-thickening was not detected.",
        "No pleural effusion or pleural thickening was observed.",
        "There is no pleural effusion.",
    ],
    "airways": [
        "Trachea and both main bronchi are open.",
        "Trachea and both main bronchi are in the midline and no obstructive pathology was observed in the "
        "lumen.",
        "The trachea and main bronchi are patent.",
    ],
    "nodes": [
        "No enlarged lymph nodes were detected in the prevascular, paratracheal, subcarinal or bilateral "
        "hilar regions.",
        "No lymph node of pathological size was observed in the mediastinum or hila.",
        "Mediastinal and hilar lymph nodes are not enlarged.",
    ],
    "esophagus": [
        "Thoracic esophageal calibration is normal and no significant wall thickening was detected.",
        "The thoracic esophagus has a normal calibre.",
    ],
    "mediastinum_intro": [
        "Mediastinal structures cannot be evaluated optimally because the examination is non-contrast.",
        "The mediastinum could not be evaluated optimally in the non-contrast examination.",
    ],
    "heart": [
        "Heart contour and size are normal.",
        "Heart size is within normal limits.",
        "The heart is of normal size.",
    ],
    "pericardium": [
        "Pericardial effusion-thickening was not observed.",
        "No pericardial effusion was detected.",
    ],
    "aorta": [
        "Thoracic aorta diameter is normal.",
        "The thoracic aorta is of normal calibre.",
        "Mediastinal main vascular structures are of normal calibre.",
    ],
    "bone": [
        "No lytic-destructive lesion was detected in the bone structures.",
        "Bone structures in the study area are natural and vertebral corpus heights are preserved.",
        "No lytic or blastic lesion was observed in the osseous structures.",
    ],
    "abdomen": [
        "Upper abdominal organs included in the sections are normal.",
        "No space-occupying lesion was detected in the liver, spleen or kidneys within the sections.",
        "The upper abdominal organs within the field of view are unremarkable.",
    ],
    "abdomen_other": [
        "Other upper abdominal organs included in the sections are normal.",
        "The liver and spleen within the sections are normal.",
    ],
}
_NORMAL_IMPRESSION = ["No significant pathology.", "Thoracic CT examination within normal limits.",
                      "No significant pathology was detected."]
_CLINICAL = ["Cough.", "Shortness of breath.", "Chest pain.", "Follow-up.", "Fever and cough.", "Screening.",
             "Dyspnea.", "Not given."]


def compose_report(findings: list[Finding], rng: np.random.Generator, slice_mm: float) -> Report:
    by_class = {f["class"]: f for f in findings}
    per_region: dict[str, list[Sentence]] = {r: [] for r in REGIONS}

    def normal(key: str, region: str, anatomy: str) -> None:
        per_region[region].append(Sentence(region, anatomy, _pick(rng, _NORMAL[key])))

    def planted(cls: str) -> bool:
        if cls in by_class:
            per_region_add = finding_sentences(by_class[cls], rng)
            for s in per_region_add:
                per_region[s.region].append(s)
            return True
        return False

    # lung parenchyma, then pleura
    lung_classes = ("Lung nodule", "Emphysema", "Consolidation", "Lung opacity", "Atelectasis")
    lung_hits = [planted(c) for c in lung_classes]
    if not any(lung_hits):
        normal("lung", "lung", "lung")
    if not planted("Pleural effusion"):
        normal("pleura", "lung", "pleura")
    normal("airways", "airways", "trachea and bronchie")
    if rng.random() < 0.5:
        normal("mediastinum_intro", "mediastinum", "mediastinum")
    if not planted("Lymphadenopathy"):
        normal("nodes", "mediastinum", "mediastinum")
    if not planted("Hiatal hernia"):
        normal("esophagus", "mediastinum", "esophagus")
    if not planted("Cardiomegaly"):
        normal("heart", "heart", "heart")
    if not planted("Pericardial effusion"):
        normal("pericardium", "heart", "heart")
    normal("aorta", "heart", "heart")
    planted("Arterial wall calcification")
    planted("Coronary artery wall calcification")
    normal("bone", "osseous", "bone")
    if planted("Kidney cyst"):
        normal("abdomen_other", "abdomen", "abdomen")
    else:
        normal("abdomen", "abdomen", "abdomen")

    sentences = [s for r in REGIONS for s in per_region[r]]
    if findings:
        impressions = " ".join(_cap(impression_phrase(f)) + "." for f in findings)
    else:
        impressions = _pick(rng, _NORMAL_IMPRESSION)
    technique = _pick(rng, [
        f"Non-contrast axial images of the thorax were obtained with {slice_mm:.1f} mm slice thickness.",
        f"Thoracic CT was performed without intravenous contrast; axial sections of {slice_mm:.1f} mm were "
        f"reconstructed.",
    ])
    return Report(clinical=_pick(rng, _CLINICAL), technique=technique, sentences=sentences,
                  impressions=impressions)
