"""CLI / import shim for the demo cohort generator (implementation: `pipeline.demo`).

    python -m pipeline.demo_cohort --out results/demo/cohort --params-json '{"n_cases": 80, "seed": 0}' [--workers 2]
"""

from pipeline.demo.cohort import MASK_NAMES, generate_demo_cohort, main

__all__ = ["MASK_NAMES", "generate_demo_cohort", "main"]

if __name__ == "__main__":
    main()
