"""GREEN adapter: the GREEN prompt, a parser of the model's answer, and scoring with a local model folder.

GREEN (Ostmeier et al., 2024; PyPI ``green_score``) asks a fine-tuned LLM (default GREEN-RadLlama2-7b) to
list, for a candidate report against a reference, clinically significant and insignificant errors in six
categories (a)-(f) and the matched findings, in a fixed answer format. Per report:

    GREEN = matched / (matched + sum of the six clinically significant error counts)

with GREEN's own conventions: 0 when there are no matched findings (also when there are no errors); a
category answered "None"/"No ..." counts 0; a sub-category that is not listed counts 0. An answer without
the ``[Clinically Significant Errors]`` and ``[Matched Findings]`` sections is **unparsed**: its score is
missing (None), never 0, and the count of unparsed answers is reported. The experiment's GREEN is the mean
over parsed answers (``averaging: report-mean``).

The prompt reproduces GREEN's template word for word (a model fine-tuned on it must see it unchanged); the
chat turn uses GREEN's ``{"from": "human", "value": ...}`` message form when the tokenizer's chat template
reads those keys, else ``{"role": "user", "content": ...}``, else the bare prompt. Decoding is greedy
(GREEN requires ``do_sample=False``); only the newly generated tokens are parsed.

    python -m pipeline.evaluate.green --predictions P --references R --model DIR --out green.json \\
        [--params-json '{"device": "auto", "batch_size": 4}']

The PyPI package pins Python 3.12.1 / torch 2.2 / transformers 4.40, so it is not imported: this module
needs only transformers and a local model folder (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.stage_config import SettingsError, parse_settings

SIGNIFICANT = "Clinically Significant Errors"
INSIGNIFICANT = "Clinically Insignificant Errors"
MATCHED = "Matched Findings"
SUB_CATEGORIES: tuple[str, ...] = (
    "(a) False report of a finding in the candidate",
    "(b) Missing a finding present in the reference",
    "(c) Misidentification of a finding's anatomic location/position",
    "(d) Misassessment of the severity of a finding",
    "(e) Mentioning a comparison that isn't in the reference",
    "(f) Omitting a comparison detailing a change from a prior study",
)

IMPLEMENTATION = (
    "GREEN (Ostmeier et al. 2024) prompt and answer format, parsed by pipeline.evaluate.green; "
    "matched / (matched + clinically significant errors), 0 when nothing matched; unparsed answers missing"
)

_PROMPT = """Objective: Evaluate the accuracy of a candidate radiology report in comparison to a reference radiology report composed by expert radiologists.

    Process Overview: You will be presented with:

    1. The criteria for making a judgment.
    2. The reference radiology report.
    3. The candidate radiology report.
    4. The desired format for your assessment.

    1. Criteria for Judgment:

    For each candidate report, determine:

    The count of clinically significant errors.
    The count of clinically insignificant errors.

    Errors can fall into one of these categories:

    a) False report of a finding in the candidate.
    b) Missing a finding present in the reference.
    c) Misidentification of a finding's anatomic location/position.
    d) Misassessment of the severity of a finding.
    e) Mentioning a comparison that isn't in the reference.
    f) Omitting a comparison detailing a change from a prior study.
    Note: Concentrate on the clinical findings rather than the report's writing style. Evaluate only the findings that appear in both reports.

    2. Reference Report:
    {reference}

    3. Candidate Report:
    {candidate}

    4. Reporting Your Assessment:

    Follow this specific format for your output, even if no errors are found:
    ```
    [Explanation]:
    <Explanation>

    [Clinically Significant Errors]:
    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>
    ....
    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>

    [Clinically Insignificant Errors]:
    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>
    ....
    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>

    [Matched Findings]:
    <The number of matched findings>. <Finding 1>; <Finding 2>; ...; <Finding n>
    ```
"""  # noqa: E501 - GREEN's template, unchanged


def make_prompt(reference: str, candidate: str) -> str:
    """GREEN's prompt for one (reference, candidate) pair."""
    return _PROMPT.format(reference=reference, candidate=candidate)


# ---------------------------------------------------------------------------------------------- parsing
def _section(text: str, name: str) -> str | None:
    """The body of ``[name]:`` up to the next blank line (or the end); None when the header is absent."""
    m = re.search(rf"\[{re.escape(name)}\]:\s*(.*?)(?:\n\s*\n|\Z)", text, re.DOTALL)
    return None if m is None else m.group(1)


def _category_counts(body: str | None) -> list[int]:
    counts = [0] * len(SUB_CATEGORIES)
    if body is None or body.lstrip().startswith("No"):
        return counts
    for line in body.splitlines():
        line = line.strip()
        m = re.match(r"\(([a-f1-6])\)[^:]*:\s*(\d+)\b", line)
        if not m:
            continue
        key = m.group(1)
        k = "abcdef".index(key) if key.isalpha() else int(key) - 1
        counts[k] = int(m.group(2))
    return counts


def _matched_count(body: str | None) -> int:
    if body is None or body.lstrip().startswith("No"):
        return 0
    m = re.match(r"\s*(\d+)\b", body)
    return int(m.group(1)) if m else 0


def clean_answer(text: str) -> str:
    """Strip chat residue GREEN's answers carry (end-of-sequence / unknown tokens, an assistant tag)."""
    if "<|assistant|>" in text:
        text = text.split("<|assistant|>")[-1]
    return text.replace("</s>", "").replace("<unk>", "").strip()


def parse_answer(text: str | None) -> dict:
    """Counts and score of one GREEN answer.

    Returns ``{"parsed", "green", "matched", "significant": [6], "insignificant": [6]}``; ``green`` is
    None when the answer lacks both the significant-errors and the matched-findings sections.
    """
    text = clean_answer(text or "")
    sig_body, ins_body, match_body = (_section(text, n) for n in (SIGNIFICANT, INSIGNIFICANT, MATCHED))
    parsed = sig_body is not None or match_body is not None
    significant = _category_counts(sig_body)
    insignificant = _category_counts(ins_body)
    matched = _matched_count(match_body)
    if not parsed:
        score = None
    elif matched == 0:
        score = 0.0
    else:
        score = matched / (matched + sum(significant))
    return {
        "parsed": parsed,
        "green": score,
        "matched": matched,
        "significant": significant,
        "insignificant": insignificant,
    }


def summarise(volume_ids: Sequence[str], answers: Sequence[str | None], model: str) -> dict:
    """The green.json block: mean over parsed answers, counts, per-report details."""
    rows = []
    for vid, ans in zip(volume_ids, answers, strict=True):
        p = parse_answer(ans)
        rows.append({"volume_id": vid, **p, "answer": ans})
    scores = [r["green"] for r in rows if r["green"] is not None]
    sig = np.array([r["significant"] for r in rows if r["parsed"]]) if scores else np.zeros((0, 6))
    return {
        "status": "ok" if scores else "failed",
        "reason": None if scores else "no GREEN answer could be parsed",
        "value": float(np.mean(scores)) if scores else None,
        "implementation": f"{IMPLEMENTATION}; model {model}",
        "averaging": "report-mean",
        "n_pairs": len(rows),
        "n_parsed": len(scores),
        "n_unparsed": len(rows) - len(scores),
        "significant_error_rate": {
            sub: (float(np.mean(sig[:, k] > 0)) if len(sig) else None) for k, sub in enumerate(SUB_CATEGORIES)
        },
        "per_report": rows,
    }


# ---------------------------------------------------------------------------------------------- model
class GreenModel:
    """A local causal LM folder answering GREEN prompts (greedy, batched, left padding)."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        batch_size: int = 4,
        max_new_tokens: int = 1024,
        max_length: int = 2048,
        dtype: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"GREEN model folder not found: {model_dir}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"auto": (torch.bfloat16 if device.startswith("cuda") else torch.float32),
                       "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, dtype=torch_dtype
        ).to(device).eval()
        self.device = device
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.max_length = int(max_length)
        self.name = Path(model_dir).name

    def chat_text(self, prompt: str) -> str:
        tmpl = getattr(self.tokenizer, "chat_template", None)
        if not tmpl:
            return prompt
        if re.search(r"""\[\s*['"]from['"]\s*\]|\.from\b|['"]value['"]""", tmpl):
            conv = [{"from": "human", "value": prompt}]
        else:
            conv = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    def answer(self, prompts: Sequence[str]) -> list[str]:
        import torch

        out: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                texts = [self.chat_text(p) for p in prompts[i : i + self.batch_size]]
                enc = self.tokenizer(
                    texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                    add_special_tokens=not getattr(self.tokenizer, "chat_template", None),
                ).to(self.device)
                gen = self.model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                out.extend(clean_answer(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


def score(references: Sequence[str], candidates: Sequence[str], volume_ids: Sequence[str], model: GreenModel) -> dict:
    prompts = [make_prompt(r, c) for r, c in zip(references, candidates, strict=True)]
    return summarise(volume_ids, model.answer(prompts), model.name)


@dataclass(frozen=True)
class GreenSettings:
    """The GREEN job's settings: the config's `evaluate.green` (its `model` folder is --model, `gpus` the
    job's resource)."""

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4
    max_new_tokens: int = 1024
    max_length: int = 2048

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SettingsError(f"evaluate.green.dtype {self.dtype!r}: auto, float32, bfloat16 or float16")


def main(argv: list[str] | None = None) -> int:
    from pipeline.evaluate.inputs import load_pairs
    from pipeline.evaluate.run import write_json_atomic

    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate.green", description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", required=True, type=Path, help="generated reports (.parquet, .csv or .jsonl)")
    ap.add_argument("--references", required=True, type=Path, help="reference reports")
    ap.add_argument("--model", required=True, type=Path, help="local GREEN model folder")
    ap.add_argument("--out", required=True, type=Path, help="green.json to write")
    ap.add_argument("--params-json", default="{}",
                    help='GreenSettings as JSON (evaluate.green), e.g. \'{"device": "cpu", "batch_size": 4}\'')
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        cfg = parse_settings(GreenSettings, args.params_json, section="evaluate.green")
        pairs = load_pairs(args.predictions, args.references)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = GreenModel(args.model, cfg.device, cfg.batch_size, cfg.max_new_tokens, cfg.max_length, cfg.dtype)
    result = score(pairs.references, pairs.predictions, pairs.volume_ids, model)
    result["inputs"] = pairs.report
    result["elapsed_s"] = round(time.time() - t0, 2)
    write_json_atomic(result, args.out)
    print(f"GREEN {result['value']} over {result['n_parsed']}/{result['n_pairs']} parsed answers; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
