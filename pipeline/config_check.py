"""Checks of a merged workflow config that the JSON schema cannot express, run when the workflow is planned.

`placeholder_keys`: the real-data template (`config/radgenome.yaml`) ships `/path/to/...` values; a
copy run before they are filled in would otherwise fail deep inside a job with "file not found". The
SAT paths count only when `segmentation.backend` is `sat`, the only backend that reads them.

`resolve_demo_model_paths`: with `build_demo: true` and no `path`, the demo encoder and LLM are written
under the configured `results:` folder (`<results>/demo/models/{encoder,llm}`), so two configs with
different `results:` never share, rebuild or invalidate each other's demo models.
"""

from __future__ import annotations

from typing import Any

PLACEHOLDER_PREFIX = "/path/to/"


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
