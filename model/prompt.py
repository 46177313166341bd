"""The prompt of the paper's Fig. 5, the training targets, and the parser for generated reports.

A prompt holds one placeholder token per embedding that the network splices in:

    The global visual information is provided here: <img> x 356.
    The following regions of interest have been identified: lung<mask><pos>, airway<mask><pos>, ...
    Additional clinical attribute information is provided as follows:
    Organ Volumes: ... Lesion Details: ...
    Describe this medical scan with findings.

Every token mask (6 regions + 3 lesions) keeps its `<mask><pos>` pair whether or not it is empty, so
the i-th pair always belongs to mask i. Stage 1 (connector warm-up on whole reports) uses the vision
part only; stage 2 adds mask tokens and attribute text unless an ablation switches them off.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from pipeline.constants import REGION_HEADERS, REGIONS, TOKEN_MASKS

IMG_TOKEN = "<img>"
MASK_TOKEN = "<mask>"
POS_TOKEN = "<pos>"
PLACEHOLDER_TOKENS: tuple[str, ...] = (IMG_TOKEN, MASK_TOKEN, POS_TOKEN)
IGNORE_INDEX = -100

log = logging.getLogger(__name__)

# How each token mask is named in the prompt (paper Fig. 5: "lung<region1>, airway<region2>, ...").
MASK_PROMPT_NAMES: dict[str, str] = {
    "lung": "lung",
    "airways": "airway",
    "mediastinum": "mediastinum",
    "heart": "heart",
    "osseous": "osseous",
    "abdomen": "abdomen",
    "nodule": "nodule",
    "cyst": "cyst",
    "effusion": "effusion",
}
assert tuple(MASK_PROMPT_NAMES) == TOKEN_MASKS

VISION_INTRO = "The global visual information is provided here: "
MASK_INTRO = "\nThe following regions of interest have been identified: "
ATTRIBUTE_INTRO = "\nAdditional clinical attribute information is provided as follows:\n"
INSTRUCTION = "\nDescribe this medical scan with findings."


def build_prompt_text(
    attributes: str | None = None,
    *,
    n_vision: int = 356,
    use_mask_tokens: bool = True,
    use_attributes: bool = True,
    masks: Sequence[str] = TOKEN_MASKS,
) -> str:
    """The user-side prompt of Fig. 5 as plain text with placeholder tokens."""
    parts = [VISION_INTRO, IMG_TOKEN * n_vision, "."]
    if use_mask_tokens:
        names = [MASK_PROMPT_NAMES.get(m, m) for m in masks]
        parts += [MASK_INTRO, ", ".join(f"{name}{MASK_TOKEN}{POS_TOKEN}" for name in names)]
    if use_attributes:
        if attributes is None:
            raise ValueError("use_attributes is on but no attribute text was given")
        parts += [ATTRIBUTE_INTRO, attributes.strip()]
    parts.append(INSTRUCTION)
    return "".join(parts)


def format_structured(region_texts: Mapping[str, str]) -> str:
    """Stage-2 target: `[Lung]: ...\\n[Airways]: ...` in region order, every header present."""
    lines = []
    for region in REGIONS:
        text = region_texts.get(region) or ""
        text = " ".join(str(text).split())  # one line per region
        lines.append(f"[{REGION_HEADERS[region]}]: {text}".rstrip())
    return "\n".join(lines)


def format_target(row: Mapping[str, object], stage: int) -> str:
    """Training target of one report row: stage 1 the full findings, stage 2 the structured text."""
    if stage == 1:
        return str(row.get("findings") or "").strip()
    if stage == 2:
        return format_structured({r: str(row.get(r) or "") for r in REGIONS})
    raise ValueError(f"stage must be 1 or 2, got {stage!r}")


_HEADER_TO_REGION = {header.lower(): region for region, header in REGION_HEADERS.items()}
_HEADER_RE = re.compile(
    r"\[\s*(" + "|".join(re.escape(h) for h in REGION_HEADERS.values()) + r")\s*\]\s*:?",
    re.IGNORECASE,
)


def parse_structured(text: str | None) -> dict[str, str]:
    """Split a generated `[Lung]: ... [Airways]: ...` text into the six region texts.

    Tolerant by design: sections may come in any order or be missing (-> ""), a repeated section is
    appended, text before the first header is dropped, and anything that is not a string gives six
    empty texts. Never raises.
    """
    out = {region: "" for region in REGIONS}
    if not isinstance(text, str) or not text:
        return out
    matches = list(_HEADER_RE.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = " ".join(text[m.end() : end].split())
        region = _HEADER_TO_REGION[m.group(1).lower()]
        out[region] = f"{out[region]} {body}".strip() if out[region] else body
    return out


def merge_regions(region_texts: Mapping[str, str]) -> str:
    """The merged report: the non-empty region texts in region order, space-joined."""
    return " ".join(t.strip() for r in REGIONS if (t := region_texts.get(r) or "").strip())


# --- tokenisation -------------------------------------------------------------------------------


def wrap_prompt(tokenizer, prompt_text: str) -> tuple[str, bool]:
    """Put the prompt into the tokenizer's chat template when it has one (a real instruct LM).

    Returns (text, has_bos): `has_bos` tells whether the text already starts with the template's BOS.
    The template renders the user turn and opens the assistant turn (`add_generation_prompt`), so the
    answer tokens follow directly. Without a template the prompt is followed by a newline and the
    answer starts right after it; that fallback is logged once per tokenizer.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text}], tokenize=False, add_generation_prompt=True
        )
        bos = tokenizer.bos_token
        return text, bool(bos) and text.startswith(bos)
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if name not in _PLAIN_PROMPT_LOGGED:
        _PLAIN_PROMPT_LOGGED.add(name)
        log.info("tokenizer %s has no chat template: plain prompt, the answer follows a newline", name)
    return prompt_text + "\n", False


_PLAIN_PROMPT_LOGGED: set[str] = set()
_TURN_MARK = "\u2063ANSWER\u2063"  # an answer text no template alters


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes the assistant's turn: what the answer must end with and what stops generation.

    With a chat template it is the first token the template writes after the assistant's content
    (ChatML's `<|im_end|>`, LLaMA-3's `<|eot_id|>`), which need not be the tokenizer's EOS; without a
    template, or when the template writes nothing after the content, the EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": _TURN_MARK}], tokenize=False
            )
        except Exception:  # a template that refuses this conversation: fall back to EOS
            text = ""
        if _TURN_MARK in text:
            after = text.split(_TURN_MARK, 1)[1]
            ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
            if ids:
                return int(ids[0])
    return tokenizer.eos_token_id


def encode_prompt(tokenizer, prompt_text: str) -> list[int]:
    """Token ids of the full model input before the answer (BOS included where the LM uses one)."""
    text, has_bos = wrap_prompt(tokenizer, prompt_text)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos_id = tokenizer.bos_token_id
    if not has_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id, *ids]
    return ids


def encode_target(tokenizer, target_text: str) -> list[int]:
    """Answer ids followed by the end-of-turn token (the model learns to stop; see `end_of_turn_id`)."""
    ids = list(tokenizer(target_text, add_special_tokens=False)["input_ids"])
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        ids.append(eot)
    return ids


def build_example(
    prompt_ids: Sequence[int], target_ids: Sequence[int], max_length: int
) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 on the prompt); the target is cut so the total fits max_length.

    The prompt is never cut: its placeholders must all be there for the splice.
    """
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"prompt is {len(prompt_ids)} tokens, no room for a target within max_length={max_length}"
        )
    target = list(target_ids[:room])
    input_ids = [*prompt_ids, *target]
    labels = [IGNORE_INDEX] * len(prompt_ids) + target
    return input_ids, labels
