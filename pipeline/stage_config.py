"""How a stage's settings travel from the config to its code: one JSON object, one typed dataclass.

Every rule passes its stage's section of the (schema-validated, defaults-filled) config to the stage's
CLI as one `--params-json` string; the stage's module turns it into a frozen dataclass with
`parse_settings`; a CLI calls `settings_from_cli`, which turns bad settings into its usage error.
Unknown keys are refused with the nearest known one named, so a typo can never fall back silently to
a default. The workflow checks the same thing before any job starts
(`pipeline.config_check.check_unknown_keys`); this is the second line, for CLIs run by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A stage's settings name a key the stage does not have, or miss one it needs."""


def nearest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to a misspelled one (difflib ratio >= 0.6), or None."""
    matches = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_message(key: str, known: Iterable[str], where: str) -> str:
    """`where.key` is not a setting, with the nearest known key suggested when there is one."""
    known = sorted(known)
    near = nearest_key(key, known)
    hint = f"; did you mean '{near}'?" if near else f"; known: {', '.join(known)}"
    dotted = f"{where}.{key}" if where else key
    return f"unknown config key '{dotted}'{hint}"


def parse_settings(cls: type[T], params: Mapping[str, Any] | str, section: str) -> T:
    """`cls(**params)` for a dataclass `cls`, refusing keys it does not declare.

    `params` is the mapping or its JSON text; `section` names the config section in messages.
    Lists become tuples where the field's default is a tuple (frozen dataclasses stay hashable); a
    field whose default is itself a settings dataclass (e.g. `evaluate.bootstrap`) is parsed the same
    way from its sub-mapping, as `section.field`.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{section}: settings are not valid JSON ({e})") from None
    if not isinstance(params, Mapping):
        raise SettingsError(f"{section}: settings must be a JSON object, got {type(params).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in params:
        if key not in fields:
            raise SettingsError(unknown_key_message(key, fields, section))
    missing = [name for name, f in fields.items() if name not in params
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SettingsError(f"{section}: missing setting(s) {', '.join(missing)}")
    kwargs = {}
    for key, value in params.items():
        field = fields[key]
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        if isinstance(value, list) and isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(value, Mapping) and dataclasses.is_dataclass(default):
            value = parse_settings(type(default), value, f"{section}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def settings_from_cli(parser: argparse.ArgumentParser, cls: type[T], params: str, section: str) -> T:
    """`parse_settings` for a CLI's `--params-json`: bad settings exit through `parser.error` (status 2,
    the usage line and the message), never as a traceback. A settings class's own value checks
    (`__post_init__` raising ValueError) count as bad settings too."""
    try:
        return parse_settings(cls, params, section)
    except (SettingsError, ValueError, TypeError) as e:
        parser.error(f"--params-json: {e}")
