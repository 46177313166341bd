"""The MedRegion-CT network: connector + mask extractor + a causal LM with LoRA.

    vision tokens   connector(concat(global, region))                  (B, 356, H)  -> <img> slots
    mask token      Linear(sum_l Linear_l(mask_pooled[:, m, l]))        (B, M, H)    -> <mask> slots
    spatial token   3-layer ReLU MLP(flatten(mask_grid[:, m]))          (B, M, H)    -> <pos> slots

The prompt carries one placeholder token per embedding; the embeddings are scattered into those
positions with `inputs_embeds.masked_scatter` as transformers' Llava does (no list surgery), and the
LM runs on `inputs_embeds`. The LM is any `AutoModelForCausalLM` folder; LoRA (PEFT) wraps only the LM,
connector and mask extractor stay ordinary modules.

Stage 1 trains the connector only (LM frozen, no adapter); stage 2 trains connector + mask extractor +
LoRA. `save_pretrained(dir)` writes the tokenizer, the adapter (stage 2), `connector_mask.safetensors`
and, last, `medregion_config.json` which marks the folder complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.prompt import IGNORE_INDEX, IMG_TOKEN, MASK_TOKEN, PLACEHOLDER_TOKENS, POS_TOKEN, end_of_turn_id

CONFIG_NAME = "medregion_config.json"
WEIGHTS_NAME = "connector_mask.safetensors"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MedRegionCTConfig:
    """Everything needed to rebuild the network around a base LM (saved as medregion_config.json)."""

    llm_path: str
    encoder_hidden: int  # C, width of the cached encoder features
    llm_hidden: int | None = None  # filled from the LM's config when the network is built
    n_global: int = 32  # D slices
    n_region: int = 324  # T region tokens
    n_masks: int = 9
    levels: int = 4  # L
    mask_grid: tuple[int, ...] = (8, 16, 16)
    connector: str = "linear"  # "linear" (paper) | "mlp"
    feature_norm: bool = False  # standardise the cached features with training-set statistics (FeatureNorm)
    mask_hidden: int = 1024
    use_mask_tokens: bool = True
    use_attributes: bool = True
    pooling: str = "r2"  # provenance tag of the features ("r2" | "lita")
    stage: int = 2
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = LORA_TARGETS
    max_length: int = 2048
    # rows of the placeholder tokens when they grow the vocabulary: "zero" (the demo's, and what folders
    # saved before this field hold) or "mean" of the existing rows (a pretrained LM: its output
    # distribution is not disturbed by three new logits; Hewitt 2021, "Initializing new word embeddings")
    new_token_init: str = "zero"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance

    @property
    def n_vision(self) -> int:
        return self.n_global + self.n_region

    @property
    def prompt_uses_masks(self) -> bool:
        """Stage 1 is the image-report warm-up: vision tokens only."""
        return self.stage == 2 and self.use_mask_tokens

    @property
    def prompt_uses_attributes(self) -> bool:
        return self.stage == 2 and self.use_attributes

    def __post_init__(self) -> None:
        if self.connector not in ("linear", "mlp"):
            raise ValueError(f"connector must be 'linear' or 'mlp', got {self.connector!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.new_token_init not in ("zero", "mean"):
            raise ValueError(f"new_token_init must be 'zero' or 'mean', got {self.new_token_init!r}")
        self.mask_grid = tuple(int(x) for x in self.mask_grid)
        self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mask_grid"] = list(self.mask_grid)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MedRegionCTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MedRegionCT config keys: {sorted(unknown)}")
        return cls(**d)


class Moments:
    """Count, sum and sum of squares per feature dim in float64, one chunk of samples at a time (a
    25,000-volume training set is never held in memory at once)."""

    def __init__(self) -> None:
        self.n, self.total, self.squares = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        """x: (n, *shape) samples."""
        x = x.detach().double()
        self.n += x.shape[0]
        self.total = self.total + x.sum(dim=0)
        self.squares = self.squares + x.square().sum(dim=0)


class FeatureNorm(nn.Module):
    """x -> (x - mean) / std per feature dim, with the training set's statistics (buffers, saved with
    the weights; identity until `fit`).

    Frozen-encoder features differ in scale per dim by orders of magnitude (a ViT's few huge
    "massive activation" dims; the demo encoder's HU-band fractions, some ~1e-3). Adam moves every
    weight by about lr per step whatever its input's scale, so the linear layer on raw features
    cannot pick up a dim that varies by 1e-3 in a few hundred steps; standardised, it can.
    """

    STD_FLOOR = 1e-4  # below fp16's resolution near 1 (the cache's dtype): constant dims stay ~0

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.int64))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted.item())

    @torch.no_grad()
    def fit(self, moments: Moments) -> None:
        """Set mean and std from the accumulated samples (no samples: stays as it is)."""
        if moments.n == 0:
            return
        mean = moments.total / moments.n
        var = (moments.squares / moments.n - mean.square()).clamp_min(0.0)
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp_min(self.STD_FLOOR))
        self.fitted.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Connector(nn.Module):
    """Encoder width C -> LM width H, applied token-wise (linear as the paper, or a 2-layer MLP);
    with `feature_norm`, after a fixed per-dim standardisation (`FeatureNorm`)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", feature_norm: bool = False):
        super().__init__()
        self.norm = FeatureNorm((in_dim,)) if feature_norm else None
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x if self.norm is None else self.norm(x))


class MaskExtractor(nn.Module):
    """Osprey-style mask extractor on cached, parameter-free mask pooling.

    mask_pooled (B, M, L, C) -> [with `feature_norm`: standardised per (level, dim)] -> per-level
    Linear(C -> hidden), summed over levels, Linear(hidden -> H).
    mask_grid (B, M, d, h, w) -> flatten -> Linear -> ReLU -> Linear -> ReLU -> Linear (-> H).
    """

    def __init__(self, in_dim: int, levels: int, grid_size: int, hidden: int, out_dim: int,
                 feature_norm: bool = False):
        super().__init__()
        self.norm = FeatureNorm((levels, in_dim)) if feature_norm else None
        self.level_proj = nn.ModuleList(nn.Linear(in_dim, hidden) for _ in range(levels))
        self.mask_out = nn.Linear(hidden, out_dim)
        self.spatial = nn.Sequential(
            nn.Linear(grid_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(
        self, mask_pooled: torch.Tensor, mask_grid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask_pooled.shape[2] != len(self.level_proj):
            raise ValueError(
                f"mask_pooled has {mask_pooled.shape[2]} levels, extractor expects {len(self.level_proj)}"
            )
        if self.norm is not None:
            mask_pooled = self.norm(mask_pooled)
        summed = sum(proj(mask_pooled[:, :, i]) for i, proj in enumerate(self.level_proj))
        mask_tokens = self.mask_out(summed)
        spatial_tokens = self.spatial(mask_grid.flatten(2))
        return mask_tokens, spatial_tokens


def splice(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, feats: torch.Tensor, name: str
) -> torch.Tensor:
    """Scatter feats (B, n, H) into the positions of `token_id` (n per row), Llava's masked_scatter."""
    where = input_ids == token_id
    per_row = where.sum(dim=1)
    if feats.shape[0] != input_ids.shape[0] or bool((per_row != feats.shape[1]).any()):
        raise ValueError(
            f"{name}: placeholder count per sample {per_row.tolist()} does not match "
            f"{feats.shape[0]} samples x {feats.shape[1]} embeddings"
        )
    mask = where.unsqueeze(-1).expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(
        mask, feats.to(inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1])
    )


class MedRegionCT(nn.Module):
    def __init__(self, config: MedRegionCTConfig, llm: nn.Module, tokenizer: Any):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self._add_placeholder_tokens(llm)
        self.llm = llm
        # training loss: the LM head only on the positions that predict a target token (the prompt's
        # several hundred positions x vocabulary logits are never used); False: the LM's own loss
        self.logits_on_targets = True
        hidden = llm.get_input_embeddings().embedding_dim
        config.llm_hidden = hidden
        self.connector = Connector(config.encoder_hidden, hidden, config.connector, config.feature_norm)
        grid_size = 1
        for s in config.mask_grid:
            grid_size *= s
        self.mask_extractor = (
            MaskExtractor(config.encoder_hidden, config.levels, grid_size, config.mask_hidden, hidden,
                          config.feature_norm)
            if config.prompt_uses_masks  # stage 1 prompts carry no mask tokens: no extractor to drag along
            else None
        )
        self.img_token_id, self.mask_token_id, self.pos_token_id = tokenizer.convert_tokens_to_ids(
            list(PLACEHOLDER_TOKENS)
        )

    # --- construction ---------------------------------------------------------------------------

    def _add_placeholder_tokens(self, llm: nn.Module) -> None:
        """Add <img>, <mask>, <pos> as special tokens; grow the embeddings if needed.

        New rows are zero or the mean of the existing rows (`config.new_token_init`), computed, not
        sampled, so a reload rebuilds the same rows (the adapter is saved without embedding layers).
        The input rows never reach the LM (the splice overwrites them); generation suppresses these ids.
        A tied LM (input and output share one matrix) stays tied: checked, not assumed.
        """
        tok = self.tokenizer
        missing = [t for t in PLACEHOLDER_TOKENS if t not in tok.get_vocab()]
        if missing:
            tok.add_tokens(missing, special_tokens=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        old = llm.get_input_embeddings().num_embeddings
        if len(tok) <= old:
            return
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
        inp, out = llm.get_input_embeddings(), llm.get_output_embeddings()
        tied = bool(getattr(llm.config, "tie_word_embeddings", False)) and out is not None
        if tied and out.weight is not inp.weight:
            raise ValueError(
                f"{self.config.llm_path}: the LM ties its input and output embeddings, but after adding "
                f"{len(tok) - old} placeholder tokens they are separate matrices"
            )
        mean = self.config.new_token_init == "mean"
        with torch.no_grad():
            for w in [inp.weight] + ([out.weight] if out is not None and not tied else []):
                w[old:] = w[:old].mean(dim=0, keepdim=True) if mean else 0.0
            if out is not None and getattr(out, "bias", None) is not None:
                out.bias[old:] = out.bias[:old].mean() if mean else 0.0

    @classmethod
    def from_config(cls, config: MedRegionCTConfig, dtype: torch.dtype | None = None) -> MedRegionCT:
        """Fresh network: base LM + tokenizer from config.llm_path, LoRA added for stage 2."""
        llm, tokenizer = load_llm(config.llm_path, dtype)
        model = cls(config, llm, tokenizer)
        if config.stage == 2:
            model.add_lora()
        model.set_trainable(config.stage)
        return model

    def add_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        self.check_lora_targets()
        lora = LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(self.config.lora_targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.llm = get_peft_model(self.llm, lora)

    def check_lora_targets(self) -> None:
        """Every configured LoRA target must name a linear layer of the LM (by its last name part, as
        PEFT matches); the error lists the missing names and the linear layer names the LM has."""
        names = {n.rsplit(".", 1)[-1] for n, m in self.llm.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in self.config.lora_targets if t not in names]
        if missing:
            raise ValueError(
                f"{self.config.llm_path}: LoRA target module(s) {missing} not found in "
                f"{type(self.llm).__name__}; its linear layers are {sorted(names)}"
            )

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.llm, PeftModel)

    def set_trainable(self, stage: int) -> None:
        """Stage 1: connector only. Stage 2: connector + mask extractor + LoRA; base LM always frozen."""
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.connector.parameters():
            p.requires_grad_(True)
        if stage == 2:
            if self.mask_extractor is not None:
                for p in self.mask_extractor.parameters():
                    p.requires_grad_(True)
            for name, p in self.llm.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)

    def fit_feature_norms(self, samples: Any) -> list[str]:
        """Fit the connector's and mask extractor's `FeatureNorm`s that are not fitted yet (stage 2
        keeps stage 1's connector statistics) on the training samples (items of `model.data`);
        returns the names fitted. Deterministic, so a resumed run fits the same values."""
        norms = {"connector": getattr(self.connector, "norm", None),
                 "mask_extractor": getattr(self.mask_extractor, "norm", None)}
        todo = {name: m for name, m in norms.items() if m is not None and not m.is_fitted}
        if not todo:
            return []
        moments = {name: Moments() for name in todo}
        for item in samples:  # one pass, nothing kept but the sums
            if "connector" in moments:
                moments["connector"].add(item["vision"].reshape(-1, item["vision"].shape[-1]))
            if "mask_extractor" in moments and "mask_pooled" in item:
                mp = item["mask_pooled"]
                moments["mask_extractor"].add(mp[mp.flatten(1).abs().amax(dim=1) > 0])  # absent masks are all zero
        for name, norm in todo.items():
            norm.fit(moments[name])
        return list(todo)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trainable tensors (what a training checkpoint needs; the base LM is never copied)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def enable_gradient_checkpointing(self) -> None:
        base = self.llm.get_base_model() if self.has_lora else self.llm
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False

    # --- forward --------------------------------------------------------------------------------

    def build_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        vision: torch.Tensor,
        mask_pooled: torch.Tensor | None = None,
        mask_grid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        embeds = splice(embeds, input_ids, self.img_token_id, self.connector(vision), IMG_TOKEN)
        n_mask_slots = int((input_ids == self.mask_token_id).sum() + (input_ids == self.pos_token_id).sum())
        if n_mask_slots:
            if self.mask_extractor is None:
                raise ValueError("the prompt has <mask>/<pos> tokens but the network has no mask extractor")
            if mask_pooled is None or mask_grid is None:
                raise ValueError("the prompt has <mask>/<pos> tokens but no mask features were given")
            mask_tokens, spatial_tokens = self.mask_extractor(mask_pooled, mask_grid)
            embeds = splice(embeds, input_ids, self.mask_token_id, mask_tokens, MASK_TOKEN)
            embeds = splice(embeds, input_ids, self.pos_token_id, spatial_tokens, POS_TOKEN)
        return embeds

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (
            (input_ids == self.img_token_id)
            | (input_ids == self.mask_token_id)
            | (input_ids == self.pos_token_id)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision: torch.Tensor,
        mask_pooled: torch.Tensor | None = None,
        mask_grid: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **_: Any,
    ):
        """Shapes: input_ids / attention_mask / labels (B, T); vision (B, n_vision, C); mask_pooled (B, M, L, C);
        mask_grid (B, M, d, h, w). A packed batch (`model.data.Collator(pack=True)`) is one row holding
        several samples, with `position_ids` (1, T) restarting at 0 for each: the LM then gets no attention
        mask and builds a block-diagonal causal one from the position ids."""
        embeds = self.build_inputs_embeds(input_ids, vision, mask_pooled, mask_grid)
        if labels is not None:  # never learn to predict a placeholder
            labels = labels.masked_fill(self.placeholder_mask(input_ids), IGNORE_INDEX)
        lm_kw: dict[str, Any] = {"attention_mask": attention_mask}
        if position_ids is not None:  # packed: no padding, sample boundaries from the position ids
            lm_kw = {"attention_mask": None, "position_ids": position_ids}
        if labels is None or not self.logits_on_targets:
            return self.llm(inputs_embeds=embeds, labels=labels, use_cache=False, **lm_kw)
        return self._loss_on_targets(embeds, labels, **lm_kw)

    def _loss_on_targets(self, embeds: torch.Tensor, labels: torch.Tensor, **lm_kw: Any):
        """The LM's causal loss with logits only where some row of the batch predicts a target token.

        Position p predicts token p + 1; `logits_to_keep` (a 1-D index tensor) makes the LM head run on
        those positions only. The loss is the mean cross-entropy over the non-ignored targets, what
        transformers' causal-LM loss computes on all positions. Returned `logits` are those positions'.
        """
        from transformers.modeling_outputs import CausalLMOutputWithPast

        shifted = labels[:, 1:]
        keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
        out = self.llm(inputs_embeds=embeds, logits_to_keep=keep, use_cache=False, **lm_kw)
        logits = out.logits
        targets = shifted[:, keep]
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        max_new_tokens: int = 256,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Decode a left-padded batch (see model.data.Collator(padding_side='left')).

        Greedy by default; `num_beams > 1` is beam search, `do_sample=True` samples (temperature, top_p;
        seed the global RNG for repeatable samples).
        """
        out = self.generate_ids(batch, max_new_tokens, num_beams, do_sample, temperature, top_p)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_ids(
        self,
        batch: dict[str, Any],
        max_new_tokens: int = 256,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        """The new token ids of `generate` (B, <= max_new_tokens), padded after a row's stop token.

        A row stops at the chat template's end-of-turn token (`model.prompt.end_of_turn_id`) or EOS.
        """
        input_ids = batch["input_ids"]
        if input_ids.shape[0] > 1 and bool((batch["attention_mask"][:, -1] == 0).any()):
            raise ValueError("generate needs a left-padded batch")
        device = next(self.connector.parameters()).device
        input_ids = input_ids.to(device)
        attention_mask = batch["attention_mask"].to(device)
        embeds = self.build_inputs_embeds(
            input_ids,
            batch["vision"].to(device),
            None if batch.get("mask_pooled") is None else batch["mask_pooled"].to(device),
            None if batch.get("mask_grid") is None else batch["mask_grid"].to(device),
        )
        tok = self.tokenizer
        stop = [t for t in dict.fromkeys([end_of_turn_id(tok), tok.eos_token_id]) if t is not None]
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_beams=num_beams,
            **({"temperature": temperature, "top_p": top_p} if do_sample else {}),
            pad_token_id=tok.pad_token_id,
            eos_token_id=stop[0] if len(stop) == 1 else stop,
            suppress_tokens=[self.img_token_id, self.mask_token_id, self.pos_token_id],
            use_cache=True,
        )  # decoder-only generate on inputs_embeds returns only the new tokens

    # --- persistence ----------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Tokenizer, adapter, connector + mask extractor, then medregion_config.json (completeness mark)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).unlink(missing_ok=True)  # an overwritten folder is incomplete until the end
        for sub in (TOKENIZER_DIR, ADAPTER_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
        self.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        if self.has_lora:
            self.llm.save_pretrained(str(out / ADAPTER_DIR), save_embedding_layers=False)
        own = {
            k: v.detach().to("cpu").contiguous()
            for k, v in self.state_dict().items()
            if k.startswith(("connector.", "mask_extractor."))
        }
        from pipeline.io import atomic_output

        with atomic_output(out / WEIGHTS_NAME) as tmp:
            save_file(own, str(tmp), metadata={"format": "pt"})
        cfg = self.config.to_dict()
        cfg["llm_path"] = _portable_path(self.config.llm_path, out)
        with atomic_output(out / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> MedRegionCT:
        """Load a folder written by save_pretrained, ready for generation (eval mode)."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        cfg_path = model_dir / CONFIG_NAME
        if not cfg_path.exists():
            raise FileNotFoundError(
                f"{model_dir}: no {CONFIG_NAME} (not a MedRegion-CT folder, or incomplete)"
            )
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
        d["llm_path"] = resolve_llm_path(d["llm_path"], model_dir)
        config = MedRegionCTConfig.from_dict(d)
        llm, _ = load_llm(config.llm_path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir / TOKENIZER_DIR))
        model = cls(config, llm, tokenizer)
        if (model_dir / ADAPTER_DIR).exists():
            from peft import PeftModel

            model.llm = PeftModel.from_pretrained(model.llm, str(model_dir / ADAPTER_DIR), is_trainable=False)
        model.load_own_weights(model_dir / WEIGHTS_NAME, strict=True)
        model.set_trainable(config.stage)
        for p in model.parameters():
            p.requires_grad_(False)
        if device is not None:
            model.to(device)
        return model.eval()

    def load_own_weights(
        self, path: str | os.PathLike, strict: bool = True, prefixes=("connector.", "mask_extractor.")
    ) -> list[str]:
        """Load connector / mask extractor weights from a connector_mask.safetensors; returns loaded keys."""
        try:
            loaded = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type without the file name
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        state = {k: v for k, v in loaded.items() if k.startswith(tuple(prefixes))}
        own = {k: v for k, v in self.state_dict().items() if k.startswith(tuple(prefixes))}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k in state.keys() & own.keys():
            if state[k].shape != own[k].shape:
                raise ValueError(
                    f"{path}: {k} has shape {tuple(state[k].shape)}, network has {tuple(own[k].shape)}"
                )
        self.load_state_dict(state, strict=False)
        return sorted(state)


def load_llm(path: str, dtype: torch.dtype | None = None):
    """Base causal LM + tokenizer from a local folder (or hub id when online); never remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_llm_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    llm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return llm, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_llm_folder(path: str) -> None:
    """A local LM folder must hold a model config and a tokenizer; the error says what is missing
    (transformers' own errors for these cases do not name the folder's problem)."""
    p = Path(path)
    if not p.is_dir():
        return  # a hub id (online only), left to transformers
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    hint = f"; it holds {ggufs[0]}: set llm.gguf to convert it (model.gguf_import)" if ggufs else ""
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json, not a Hugging Face model folder{hint}")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{p}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the LM's tokenizer into the folder{hint}"
        )


def _portable_path(llm_path: str, out_dir: Path) -> str:
    """Record a local LM folder relative to the output folder (so results/ can move as a whole)."""
    p = Path(llm_path)
    if not p.exists():
        return llm_path  # hub id
    try:
        return os.path.relpath(p.resolve(), out_dir.resolve())
    except ValueError:  # other drive on Windows
        return str(p.resolve())


def resolve_llm_path(recorded: str, model_dir: Path) -> str:
    p = Path(recorded)
    if p.is_absolute():
        return str(p)
    candidate = (Path(model_dir) / p).resolve()
    if candidate.exists():
        return str(candidate)
    if p.exists():
        return str(p.resolve())
    return recorded  # a hub id
