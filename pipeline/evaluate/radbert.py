"""CT-CLIP's RadBERT text classifier as a second labeler backend (same API as the rule labeler).

CT-RATE's 18 abnormality labels were produced by this model: RadBERT-RoBERTa-4m (a RoBERTa-base encoder)
whose ``pooler_output`` (dense + tanh on the <s> token) feeds ``Linear(768, 18)``; sigmoid >= 0.5 -> 1;
inputs truncated to 512 tokens. Its weights are distributed only through Hugging Face (gated CT-RATE);
nothing is downloaded here. A user who has them points the config at two local things:

  * ``model_dir``: a folder with the RadBERT-RoBERTa-4m config and tokenizer (``config.json``,
    ``vocab.json``/``merges.txt`` or ``tokenizer.json``), e.g. ``hf download zzxslp/RadBERT-RoBERTa-4m``;
  * ``weights``: the trained classifier's state dict, ``.safetensors`` (``safetensors.torch.load_file``)
    or ``.pt``/``.pth`` (``torch.load(weights_only=True)``: no pickled code runs). Keys as CT-CLIP saves
    them: ``model.<roberta parameter>`` and ``classifier.weight`` / ``classifier.bias`` (a ``module.``
    prefix from DataParallel is stripped; a ``{"state_dict": ...}`` wrapper is unwrapped). When the file
    holds only the ``classifier.*`` head, the encoder weights are read from ``model_dir``.

A head with more than 18 outputs (CT-CLIP's later 20-class variant adds "Tree in bud" and "Thymic
remnant" after the 18) uses its first 18 rows, which are the CT-RATE classes in canonical order.

Padding is to the longest text of a batch (CT-CLIP pads to 512): with the attention mask the <s> output,
and so the label, is the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pipeline.constants import CTRATE_CLASSES

CLASSES: tuple[str, ...] = CTRATE_CLASSES
MAX_LENGTH = 512
THRESHOLD = 0.5


def load_state_dict(path: str | Path) -> dict:
    """Tensors of a .safetensors or torch file, without executing pickled code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RadBERT classifier weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends: name the file and the rule
            raise ValueError(f"{path}: not loadable with torch.load(weights_only=True): {e}") from e
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


class RadBertLabeler:
    """``label_reports(texts) -> (n, 18) int64`` with CT-CLIP's RadBERT classifier."""

    CLASSES = CLASSES

    def __init__(
        self,
        weights: str | Path,
        model_dir: str | Path,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = MAX_LENGTH,
        threshold: float = THRESHOLD,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if model_dir is None or not Path(model_dir).is_dir():
            raise FileNotFoundError(f"RadBERT model folder (config + tokenizer) not found: {model_dir}")
        state = load_state_dict(weights)
        if "classifier.weight" not in state or "classifier.bias" not in state:
            raise ValueError(f"{weights}: no classifier.weight / classifier.bias (keys: {sorted(state)[:8]} ...)")
        encoder_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        if encoder_state:
            encoder = AutoModel.from_config(config)
            missing, unexpected = encoder.load_state_dict(encoder_state, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            unexpected = [k for k in unexpected if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ValueError(
                    f"{weights}: encoder weights do not fit {config.model_type} of {model_dir}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        else:
            encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        if getattr(encoder, "pooler", None) is None:
            raise ValueError(f"{model_dir}: the encoder has no pooler; CT-CLIP's classifier reads pooler_output")
        w, b = state["classifier.weight"], state["classifier.bias"]
        hidden = encoder.config.hidden_size
        if w.ndim != 2 or w.shape[1] != hidden or w.shape[0] < len(CLASSES) or b.shape[0] != w.shape[0]:
            raise ValueError(
                f"{weights}: classifier is {tuple(w.shape)}, expected ({len(CLASSES)}+, {hidden}) for this encoder"
            )
        head = torch.nn.Linear(hidden, len(CLASSES))
        with torch.no_grad():
            head.weight.copy_(w[: len(CLASSES)].float())
            head.bias.copy_(b[: len(CLASSES)].float())
        self.n_outputs = int(w.shape[0])
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.head = head.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.threshold = float(threshold)
        self.IMPLEMENTATION = (
            f"CT-CLIP RadBERT classifier ({config.model_type} encoder from {Path(model_dir).name}, "
            f"weights {Path(weights).name}, Linear({hidden}, {self.n_outputs}) pooler head, sigmoid >= "
            f"{self.threshold}, {self.max_length} tokens)"
        )

    def probabilities(self, texts: Sequence[str] | Iterable[str]) -> np.ndarray:
        import torch

        texts = ["" if t is None or (isinstance(t, float) and t != t) else str(t) for t in texts]
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[i : i + self.batch_size],
                    max_length=self.max_length,
                    truncation=True,
                    padding=True,
                    return_tensors="pt",
                ).to(self.device)
                pooled = self.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
                out.append(torch.sigmoid(self.head(pooled)).float().cpu().numpy())
        if not out:
            return np.zeros((0, len(CLASSES)), dtype=np.float32)
        return np.concatenate(out)

    def label_reports(self, texts: Sequence[str] | Iterable[str]) -> np.ndarray:
        return (self.probabilities(list(texts)) >= self.threshold).astype(np.int64)
