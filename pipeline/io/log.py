"""Logging set-up shared by every stage's command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(log_file: str | None = None) -> logging.Logger:
    """Log to stderr (Snakemake redirects it to the rule's log file) and optionally to a file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    return logging.getLogger("medregion")
