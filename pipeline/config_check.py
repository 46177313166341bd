"""Checks of a merged workflow config that the JSON schema cannot express, run when the workflow is planned.

`placeholder_keys`: the real-data template (`config/radgenome.yaml`) ships `/path/to/...` values; a
copy run before they are filled in would otherwise fail deep inside a job with "file not found". The
SAT paths count only when `segmentation.backend` is `sat`, the only backend that reads them.

`resolve_demo_model_paths`: with `build_demo: true` and no `path`, the demo encoder and LLM are written
under the configured `results:` folder (`<results>/demo/models/{encoder,llm}`), so two configs with
different `results:` never share, rebuild or invalidate each other's demo models.

`check_unknown_keys`: a key the schema does not declare (a typo such as `shard_sise` or
`features.compresor`) stops the workflow before any job starts, naming the key and the nearest valid
one; run before the schema's own validation so that this message, not jsonschema's, is the one shown.

`with_defaults` / `schema_defaults`: a config section with the schema's defaults filled in (the way
Snakemake's `validate` fills them), for rule files included without the Snakefile's validation and for
the test that keeps each stage's settings dataclass equal to its schema section.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from pipeline.stage_config import unknown_key_message

PLACEHOLDER_PREFIX = "/path/to/"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def placeholder_keys(config: dict[str, Any]) -> list[str]:
    """Dotted keys (list items as `key[i]`) whose value still starts with `/path/to/`."""
    found: list[str] = []

    def walk(value: Any, key: str) -> None:
        if key == "segmentation.sat" and config.get("segmentation", {}).get("backend") != "sat":
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, str) and value.startswith(PLACEHOLDER_PREFIX):
            found.append(key)

    walk(config, "")
    return found


def check_placeholders(config: dict[str, Any]) -> None:
    keys = placeholder_keys(config)
    if keys:
        raise ValueError(f"the config still has the template's placeholder paths ({PLACEHOLDER_PREFIX}...) in "
                         f"{', '.join(keys)}: fill them in with your own paths (see docs/own-data.md)")


def resolve_demo_model_paths(config: dict[str, Any], results: str) -> None:
    """Fill `features.encoder.path` / `llm.path` in place: unset + build_demo -> under `results`."""
    for section, name in ((config["features"]["encoder"], "encoder"), (config["llm"], "llm")):
        where = "features.encoder" if name == "encoder" else "llm"
        if section.get("path") in (None, ""):
            if name == "llm" and section.get("gguf"):
                continue  # the GGUF import rule (llm.smk) names the converted folder
            if not section.get("build_demo", False):
                raise ValueError(f"{where}.path is not set: give the local model folder, or set "
                                 f"{where}.build_demo: true for the demo model"
                                 + (" (or llm.gguf, a GGUF file to import)" if name == "llm" else ""))
            section["path"] = f"{results}/demo/models/{name}"


@functools.lru_cache(maxsize=1)
def _schema_file() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def load_schema() -> dict[str, Any]:
    """The workflow's config schema (workflow/schemas/config.schema.yaml), a fresh copy."""
    return copy.deepcopy(_schema_file())


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The schema and the subschemas that may add properties to the same object (allOf, if-then-else)."""
    out = [schema]
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            out += _branches(sub)
    for key in ("then", "else"):
        if isinstance(schema.get(key), dict):
            out += _branches(schema[key])
    return out


def check_unknown_keys(config: Any, schema: dict[str, Any] | None = None, where: str = "") -> None:
    """Raise ValueError naming the first config key the schema does not declare, with the nearest known one.

    An object is closed when its schema says `additionalProperties: false`; a schema-valued
    `additionalProperties` (user-named keys such as experiment names) checks each value against it.
    """
    if schema is None:
        schema = _schema_file()
    if isinstance(config, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for i, value in enumerate(config):
                check_unknown_keys(value, items, f"{where}[{i}]")
        return
    if not isinstance(config, dict):
        return
    branches = _branches(schema)
    properties: dict[str, Any] = {}
    for branch in branches:
        for key, sub in branch.get("properties", {}).items():
            properties.setdefault(key, sub)
    extra = schema.get("additionalProperties")
    for key, value in config.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key in properties:
            check_unknown_keys(value, properties[key], dotted)
        elif isinstance(extra, dict):
            check_unknown_keys(value, extra, dotted)
        elif extra is False:
            raise ValueError(unknown_key_message(str(key), properties, where))


def with_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """`value` (a copy) with the schema's defaults filled in where keys are missing, recursively."""
    if value is None and "default" in schema and isinstance(schema["default"], dict):
        value = copy.deepcopy(schema["default"])
    if not isinstance(value, dict) or "properties" not in schema:
        return copy.deepcopy(value)
    out = copy.deepcopy(value)
    for key, sub in schema["properties"].items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = with_defaults(out[key], sub)
    return out


def section_schema(dotted: str) -> dict[str, Any]:
    """The schema of a config section, e.g. `evaluate.bootstrap`."""
    schema = _schema_file()
    for key in dotted.split("."):
        schema = schema["properties"][key]
    return schema


def schema_defaults(dotted: str) -> dict[str, Any]:
    """The defaults of a config section's keys (keys without a default left out), filled recursively."""
    return with_defaults({}, section_schema(dotted))


def section(config: dict[str, Any], dotted: str) -> dict[str, Any]:
    """A config section with the schema's defaults filled in (already so in a validated config)."""
    value: Any = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return with_defaults(value if value is not None else {}, section_schema(dotted))


def without(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A section less the keys that reach a job another way (its threads, GPUs, a model folder flag)."""
    return {k: v for k, v in settings.items() if k not in keys}
