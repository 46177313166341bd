"""M3D-style LLM judge: a 0-100 score of how much of the reference a generated report gets right.

The prompt is M3D's caption-evaluation prompt (BAAI-DCAI/M3D ``Bench/eval/eval_with_llm.py``), which the
MedRegion-CT paper's "GPT-4" column follows: identify the aspects of the ground truth and score the share
that the prediction mentions correctly or partially, 0-100, answering ``Score: xx``. It is sent to any
OpenAI-compatible ``/chat/completions`` endpoint named in the config (a local vLLM, or a hosted API; the
API key, if any, is read from the environment variable the config names, never from the config itself).

Parsing is tolerant (:func:`parse_score`): ``Score: 72``, ``Score: 72.5``, ``**Score:** 72``,
``score = 72/100``, ``Score: 7.2/10`` (scaled to 100), the last such statement wins; values outside 0-100
and answers without a score are **missing** (None), never 0. Requests that still fail after the retries are
missing too. The experiment's judge score is the mean over reports with a score (``averaging:
report-mean``), reported with the numbers of scored, missing and failed pairs.

    python -m pipeline.evaluate.judge --predictions P --references R --out judge.json \\
        --params-json '{"endpoint": "http://127.0.0.1:8000/v1", "model": "NAME"}'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.stage_config import SettingsError, parse_settings

SYSTEM_PROMPT = "You are an AI assistant, please evaluate based on the following."
USER_PROMPT = (
    "Please refer to the ground truth and prediction based on the following two paragraphs, identify the "
    "aspects mentioned in the ground truth, and calculate the percentage of these aspects that are either "
    "correctly mentioned or partially matched in the prediction, scoring from 0 to 100.\n"
    "ground truth: {reference}\n"
    "prediction: {prediction}\n\n"
    "The output format is:\n"
    "Score: xx."
)
IMPLEMENTATION = "M3D-style LLM judge prompt (0-100), OpenAI-compatible chat endpoint, temperature 0"

_SCORE = re.compile(
    r"score\s*\**\s*[:：=]\s*\**\s*(\d{1,3}(?:\.\d+)?)(?!\d)\s*(?:(%)|/\s*(100|10)\b)?",
    re.IGNORECASE,
)


def make_messages(reference: str, prediction: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_PROMPT.format(reference=reference, prediction=prediction)},
    ]


def parse_score(text: str | None) -> float | None:
    """The 0-100 score in a judge answer, or None (see the module docstring)."""
    if not text:
        return None
    matches = list(_SCORE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    value = float(m.group(1))
    if m.group(3) == "10":
        value *= 10.0
    if not 0.0 <= value <= 100.0:
        return None
    return value


class JudgeClient:
    """Minimal OpenAI-compatible chat client (stdlib only), with retries on 429 / 5xx / connection errors."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        max_tokens: int = 256,
        backoff_s: float = 1.0,
    ) -> None:
        url = endpoint.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.api_key:
            raise ValueError(f"judge api_key_env {api_key_env!r} is set in the config but not in the environment")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.max_tokens = int(max_tokens)
        self.backoff_s = float(backoff_s)

    def chat(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                content = data["choices"][0]["message"]["content"]
                return "" if content is None else str(content)
            except urllib.error.HTTPError as e:
                last = e
                if e.code != 429 and e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError, KeyError,
                    IndexError, TypeError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise RuntimeError(f"judge request failed: {last}")


def score(
    references: Sequence[str],
    predictions: Sequence[str],
    volume_ids: Sequence[str],
    client: JudgeClient,
    max_workers: int = 4,
) -> dict:
    """The judge.json block: per-report answers and scores, mean over the parsed ones."""

    def one(pair: tuple[str, str]) -> tuple[str | None, str | None]:
        try:
            return client.chat(make_messages(*pair)), None
        except RuntimeError as e:
            return None, str(e)

    with ThreadPoolExecutor(max_workers=max(1, int(max_workers))) as pool:
        results = list(pool.map(one, zip(references, predictions, strict=True)))
    rows = []
    for vid, (answer, error) in zip(volume_ids, results):
        rows.append({"volume_id": vid, "score": parse_score(answer), "answer": answer, "error": error})
    scores = [r["score"] for r in rows if r["score"] is not None]
    n_failed = sum(r["error"] is not None for r in rows)
    return {
        "status": "ok" if scores else "failed",
        "reason": None if scores else (f"{n_failed} request(s) failed" if n_failed else "no score could be parsed"),
        "value": float(np.mean(scores)) if scores else None,
        "scale": "0-100",
        "implementation": f"{IMPLEMENTATION}; model {client.model} at {client.url}",
        "averaging": "report-mean",
        "n_pairs": len(rows),
        "n_scored": len(scores),
        "n_missing": len(rows) - len(scores),
        "n_failed_requests": n_failed,
        "per_report": rows,
    }


@dataclass(frozen=True)
class JudgeSettings:
    """The judge job's settings: the config's `evaluate.judge`. The API key is read from the environment
    variable `api_key_env` names, never from the settings."""

    endpoint: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    max_workers: int = 4
    timeout_s: float = 120
    retries: int = 3
    max_tokens: int = 256


def main(argv: list[str] | None = None) -> int:
    from pipeline.evaluate.inputs import load_pairs
    from pipeline.evaluate.run import write_json_atomic

    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate.judge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", required=True, type=Path, help="generated reports (.parquet, .csv or .jsonl)")
    ap.add_argument("--references", required=True, type=Path, help="reference reports")
    ap.add_argument("--out", required=True, type=Path, help="judge.json to write")
    ap.add_argument("--params-json", required=True,
                    help="JudgeSettings as JSON (evaluate.judge): endpoint (OpenAI-compatible base URL, e.g. "
                         "http://127.0.0.1:8000/v1) and model are needed; api_key_env, max_workers, timeout_s, "
                         "retries, max_tokens optional")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        cfg = parse_settings(JudgeSettings, args.params_json, section="evaluate.judge")
        if not cfg.endpoint or not cfg.model:
            raise SettingsError("evaluate.judge: endpoint and model must both be set")
        pairs = load_pairs(args.predictions, args.references)
        client = JudgeClient(cfg.endpoint, cfg.model, cfg.api_key_env, float(cfg.timeout_s), cfg.retries, cfg.max_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = score(pairs.references, pairs.predictions, pairs.volume_ids, client, cfg.max_workers)
    result["inputs"] = pairs.report
    result["elapsed_s"] = round(time.time() - t0, 2)
    write_json_atomic(result, args.out)
    print(f"judge {result['value']} (0-100) over {result['n_scored']}/{result['n_pairs']} scored; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
