"""QC pictures: axial and coronal CT slices of sampled volumes with the region and lesion overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.constants import CHANNELS, REGIONS
from pipeline.io import atomic_output, image_array, read_image
from pipeline.label_colours import LESION_COLOURS, REGION_COLOURS  # QC overlays: the export's colours
from pipeline.orientation import reorientation
from pipeline.regions.grid import CtGrid
from pipeline.regions.table import unpack_channel


def qc_picture(ct_path: Path, labels: np.ndarray, grid: CtGrid, volume_id: str, out_png: Path) -> None:
    """Three axial and two coronal CT slices with the region (filled) and lesion (outlined) overlays, in the
    radiological convention (patient right on the image's left; anterior up, coronal: superior up); the
    CT is turned to the canonical grid of `labels` first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image = read_image(ct_path, volume_id)
    # canonical LPS grid, as the masks: an axial slice [y, x] is then drawn in the radiological
    # convention as it is (patient right on the image's left, anterior up); a coronal one with z reversed
    ct = reorientation(image.GetDirection()).array(image_array(image, ct_path, volume_id, np.float32))
    nz, ny, nx = labels.shape
    region_bits = [CHANNELS.index(r) for r in REGIONS]
    lung = unpack_channel(labels, "lung")
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    z_pick = (np.linspace(zs[0], zs[-1], 5)[1:4] if zs.size else np.linspace(0, nz - 1, 5)[1:4]).round().astype(int)
    ys = np.flatnonzero((labels != 0).any(axis=(0, 2)))
    y_pick = (np.linspace(ys[0], ys[-1], 4)[1:3] if ys.size else [ny // 3, 2 * ny // 3])
    views = [("axial", int(z)) for z in z_pick] + [("coronal", int(round(y))) for y in y_pick]
    sx, sy, sz = grid.spacing[:3]
    fig, axes = plt.subplots(1, len(views), figsize=(3.2 * len(views), 3.6), dpi=90)
    cmap = ListedColormap([REGION_COLOURS[r] for r in REGIONS])
    for ax, (kind, i) in zip(axes, views):
        if kind == "axial":
            img, lab, aspect = ct[i], labels[i], sy / sx
        else:
            img, lab, aspect = ct[::-1, i, :], labels[::-1, i, :], sz / sx
        ax.imshow(np.clip(img, -1000, 600), cmap="gray", vmin=-1000, vmax=600, aspect=aspect, interpolation="nearest")
        region = np.full(lab.shape, -1.0)
        for k, bit in enumerate(region_bits):  # later regions drawn over earlier ones
            region[(lab >> np.uint32(bit)) & np.uint32(1) == 1] = k
        ax.imshow(np.ma.masked_less(region, 0), cmap=cmap, vmin=0, vmax=len(REGIONS) - 1, alpha=0.35,
                  aspect=aspect, interpolation="nearest")
        for lesion, colour in LESION_COLOURS.items():
            m = ((lab >> np.uint32(CHANNELS.index(lesion))) & np.uint32(1)).astype(float)
            if m.any():
                ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.0)
        ax.set_title(f"{kind} {'z' if kind == 'axial' else 'y'}={i}", fontsize=8)
        for x, side in ((0.01, "R"), (0.93, "L")):  # radiological convention: patient right on the left
            ax.text(x, 0.5, side, transform=ax.transAxes, color="yellow", fontsize=8, va="center")
        ax.axis("off")
    handles = [Patch(color=REGION_COLOURS[r], label=r) for r in REGIONS]
    handles += [Patch(edgecolor=c, facecolor="none", label=lesion) for lesion, c in LESION_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(f"{volume_id}: regions (filled) and lesions (outlined)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def sample_for_pictures(volume_ids: Sequence[str], n: int) -> list[str]:
    """`n` volumes spread evenly over the shard (first, last, in between), deterministic."""
    if n <= 0 or not volume_ids:
        return []
    idx = np.unique(np.linspace(0, len(volume_ids) - 1, min(n, len(volume_ids))).round().astype(int))
    return [volume_ids[i] for i in idx]


class _picture_dir:
    """Context manager: a temporary folder renamed to `path` on success (None: no pictures)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._cm = atomic_output(path) if path is not None else None

    def __enter__(self) -> Path | None:
        if self._cm is None:
            return None
        tmp = self._cm.__enter__()
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def __exit__(self, *exc: object) -> bool | None:
        return self._cm.__exit__(*exc) if self._cm is not None else None
