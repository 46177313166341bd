"""Names shared by every stage: regions, mask channels, abnormality classes.

These are the seams of the product. A stage never spells a region or class name itself; it imports it
from here so that the region table, the feature cache, the prompt and the evaluation agree.
"""

from __future__ import annotations

# The six regions of the paper (Sec. 3.1), in prompt/report order. `key` is the column / section name
# used everywhere downstream; `header` is the section tag of the structured report (paper Fig. 5).
REGIONS: tuple[str, ...] = ("lung", "airways", "mediastinum", "heart", "osseous", "abdomen")
REGION_HEADERS: dict[str, str] = {
    "lung": "Lung",
    "airways": "Airways",
    "mediastinum": "Mediastinum",
    "heart": "Heart",
    "osseous": "Osseous",
    "abdomen": "Abdomen",
}
REGION_TITLES: dict[str, str] = {
    "lung": "lung",
    "airways": "large airways",
    "mediastinum": "mediastinum",
    "heart": "heart and great vessels",
    "osseous": "osseous structures",
    "abdomen": "upper abdomen",
}

# Lesion channels (paper Sec. 3.4): each gets a mask token pair and attribute lines.
LESIONS: tuple[str, ...] = ("nodule", "cyst", "effusion")

# The masks that get segmentation tokens, in their fixed prompt order (6 regions, then 3 lesions).
TOKEN_MASKS: tuple[str, ...] = REGIONS + LESIONS

# Fine structures the attribute prompt measures (paper Fig. 5).
LOBES: tuple[str, ...] = (
    "right_upper_lobe",
    "right_middle_lobe",
    "right_lower_lobe",
    "left_upper_lobe",
    "left_lower_lobe",
)
HEART_CHAMBERS: tuple[str, ...] = ("left_atrium", "right_atrium", "left_ventricle", "right_ventricle")
ORGANS: tuple[str, ...] = ("liver", "left_kidney", "right_kidney")
ATTRIBUTE_STRUCTURES: tuple[str, ...] = LOBES + HEART_CHAMBERS + ORGANS

# Every channel of the compact mask array, bit i of the uint32 voxel word = CHANNELS[i].
CHANNELS: tuple[str, ...] = TOKEN_MASKS + ATTRIBUTE_STRUCTURES
assert len(CHANNELS) <= 32, "channels are bit-packed into uint32"

# CT-RATE's 18 abnormality classes, canonical column order of its label CSV.
CTRATE_CLASSES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
