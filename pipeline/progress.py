"""Progress bars that suit where they are shown: live on a terminal, a line a minute in a rule's log.

tqdm redraws with `\r` every 0.1 s; written into a Snakemake log file that is thousands of
overwritten lines. On a terminal the bar draws as usual; otherwise it updates at most once per
`LOG_INTERVAL_S` with plain ASCII, so a log stays readable and still shows that long work moves.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 60.0


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, drawn live only when stderr (or `file`) is a terminal."""
    stream = kwargs.get("file") or sys.stderr
    is_terminal = bool(getattr(stream, "isatty", lambda: False)())
    if not is_terminal:
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]))
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)
