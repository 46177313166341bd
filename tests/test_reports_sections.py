"""The free-text sentence -> region classifier (pipeline.evaluate.sections, used by pipeline.reports)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from pipeline import reports
from pipeline.constants import REGIONS
from pipeline.evaluate.sections import assign_regions, classify_sentence, split_report, split_sentences

CTRATE_CSV = Path(__file__).parents[1] / ".." / "shared" / "data" / "ctrate-text-classifier" / "train.csv"

# Spot checks: sentences as CT-RATE reports write them, and the region a reader would file them under.
SPOT_CHECKS = [
    ("Trachea and both main bronchi are open.", "airways"),
    ("No occlusive pathology was detected in the trachea and both main bronchi.", "airways"),
    ("Mediastinal main vascular structures, heart contour, size are normal.", "heart"),
    ("Thoracic aorta diameter is normal.", "heart"),
    ("Pericardial effusion-thickening was not observed.", "heart"),
    ("Calcified atheroma plaques are observed in the coronary arteries.", "heart"),
    ("The diameter of the main pulmonary artery is 32 mm.", "heart"),
    ("The image of the catheter extending to the superior vena cava is seen on the right.", "heart"),
    ("Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected.",
     "mediastinum"),
    ("No enlarged lymph nodes were detected in prevascular, pre-paratracheal, subcarinal or bilateral "
     "hilar-axillary pathological dimensions.", "mediastinum"),
    ("Both thyroid lobes are of normal size.", "mediastinum"),
    ("There is a sliding type hiatal hernia.", "mediastinum"),
    ("When examined in the lung parenchyma window; aeration of both lung parenchyma is normal.", "lung"),
    ("Pleural effusion-thickening was not detected.", "lung"),
    ("Millimetric nodules are observed.", "lung"),
    ("Ground glass densities in the posterobasal segment of the right lower lobe.", "lung"),
    ("Emphysematous changes are observed in both upper lobes.", "lung"),
    ("Upper abdominal organs included in the sections are normal.", "abdomen"),
    ("Contour, size, parenchymal density of the liver are normal.", "abdomen"),
    ("No space-occupying lesion was detected in the liver that entered the cross-sectional area.", "abdomen"),
    ("Bilateral adrenal glands were normal and no space-occupying lesion was detected.", "abdomen"),
    ("Bone structures in the study area are natural.", "osseous"),
    ("Vertebral corpus heights are preserved.", "osseous"),
    ("There is an increase in thoracic kyphosis.", "osseous"),
    ("Degenerative changes were observed in the bilateral shoulder joint.", "osseous"),
    ("A 12 mm nodule in the left breast.", "osseous"),
]


@pytest.mark.parametrize("sentence, region", SPOT_CHECKS)
def test_spot_checks(sentence, region):
    assert classify_sentence(sentence) == region


def test_context_and_default():
    sents = ["It was compared with the CT examination dated 01.01.2020.", "Trachea is open.", "Lumens are clear.",
             "Heart size is normal.", "Follow-up is recommended."]
    assert assign_regions(sents) == [("airways", "context"), ("airways", "term"), ("airways", "context"),
                                     ("heart", "term"), ("heart", "context")]
    assert assign_regions(["Follow-up is recommended."]) == [("lung", "default")]
    assert split_sentences('Trachea open. " Thorax CT within normal limits.\n.') == [
        "Trachea open.", "Thorax CT within normal limits."]


def test_every_sentence_of_the_real_reports_is_assigned():
    if not CTRATE_CSV.exists():
        pytest.skip(f"{CTRATE_CSV} not present")
    texts = pd.read_csv(CTRATE_CSV)["report_text"].fillna("").tolist()
    how, where, n = Counter(), Counter(), 0
    for text in texts:
        sents = split_sentences(text)
        assigned = assign_regions(sents)
        assert len(assigned) == len(sents)
        parts = split_report(text)
        # every sentence lands in a region text
        joined = " ".join(parts[r] for r in REGIONS)
        assert all(s in joined for s in sents)
        n += len(sents)
        how.update(h for _, h in assigned)
        where.update(r for r, _ in assigned)
    assert n > 15000 and set(where) == set(REGIONS)
    assert how["term"] / n > 0.85  # most sentences name their anatomy; the rest follow their neighbours
    assert how["default"] == 0


def test_reports_stage_uses_the_classifier():
    texts = reports.region_texts_from_keywords(
        "Trachea and both main bronchi are open. A 5 mm nodule is seen in the right lung. "
        "Heart size is normal. No lytic lesion in the bones. Follow-up is recommended."
    )
    assert texts["airways"].startswith("Trachea") and "nodule" in texts["lung"]
    assert texts["heart"] == "Heart size is normal."
    assert texts["osseous"] == "No lytic lesion in the bones. Follow-up is recommended."
    assert reports.classify_sentence is classify_sentence
