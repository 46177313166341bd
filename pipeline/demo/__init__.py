"""The demo's synthetic cohort: chest-CT phantoms with planted findings in RadGenome-Chest CT's layout.

`generate_demo_cohort(out_dir, n_cases=80, seed=0, ...)` writes volumes, SAT-style masks, CT-RATE style
reports / labels, RadGenome region reports, splits and the planted ground truth (see `cohort`).
"""

from pipeline.demo.cohort import MASK_NAMES, generate_demo_cohort, main

__all__ = ["MASK_NAMES", "generate_demo_cohort", "main"]
