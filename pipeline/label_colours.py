"""Colours of the six regions and the three lesion channels, shared by the QC pictures and the exported
label maps (3D Slicer / ITK-SNAP colour tables).

Chosen to stay visible on every tissue a chest CT shows in a soft-tissue or lung window: air (black),
lung (dark grey), fat and soft tissue (mid grey) and bone or contrast (near white). Every colour is
saturated (no near-white or near-black entry, which vanish on bone or air) and the regions differ in hue.
"""

from __future__ import annotations

REGION_COLOURS: dict[str, str] = {
    "lung": "#1e90ff",  # blue
    "airways": "#00c8c8",  # cyan
    "mediastinum": "#ff8c00",  # orange
    "heart": "#dc143c",  # crimson
    "osseous": "#9400d3",  # violet: bone is near white, so no pale colour here
    "abdomen": "#32cd32",  # green
}
LESION_COLOURS: dict[str, str] = {"nodule": "#ffff00", "cyst": "#ff00ff", "effusion": "#00ff7f"}


def rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
