"""Every command-line program of pipeline/ and model/ names itself as it is run (`usage: python -m
pipeline.regions ...`, not `usage: regions.py ...`) and says what each of its options is for.

The programs are found, not listed: every module of pipeline/ and model/ that builds an
argparse.ArgumentParser. Its parser is built by calling the module's `main([])` with
ArgumentParser.parse_args / parse_known_args replaced by a stand-in that hands the parser back, so
nothing runs past the parsing. A module is run by `python -m` of its own name when it has an
`if __name__ == "__main__":`, and by that of every runnable module that imports its `main` (pipeline/demo/cohort.py:
`python -m pipeline.demo_cohort` and `python -m pipeline.demo`), and as a sub-command where a program hands
one on to it (SUB_COMMANDS); its program name may be any of those.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys

import pytest
from helpers import REPO

PACKAGES = ("pipeline", "model")
# module -> the sub-command that also runs it: `python -m pipeline.evaluate score ...` is handed on to
# pipeline.evaluate.score's main (pipeline/evaluate/run.py), the name the docs use
SUB_COMMANDS = {"pipeline.evaluate.score": "pipeline.evaluate score"}


def _module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p.read_text(encoding="utf-8") for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
CLI_MODULES = sorted(m for m, src in SOURCES.items() if "ArgumentParser(" in src)


def _runnable(module: str) -> bool:
    """`python -m` runs it: a package's __main__, or a module with a `__main__` guard."""
    return module.endswith(".__main__") or bool(re.search(r"^if __name__ == ['\"]__main__['\"]:", SOURCES[module], re.M))


def _imports_main_of(importer: str, module: str) -> bool:
    package = importer.rsplit(".", 1)[0]
    names = [re.escape(module)]
    if module == package:
        names.append(re.escape("."))  # from . import main
    elif module.startswith(package + "."):
        names.append(re.escape("." + module[len(package) + 1 :]))  # from .stage import main
    return any(re.search(rf"^from {name} import [^\n]*\bmain\b", SOURCES[importer], re.M) for name in names)


def run_names(module: str) -> list[str]:
    """The `python -m` names that run `module`'s main: its own (when it has a `__main__` guard) and those of
    the runnable modules that import its main at their top level (a package's __main__ runs as the package)."""
    entries = [module] if _runnable(module) else []
    entries += sorted(m for m in SOURCES if m != module and _runnable(m) and _imports_main_of(m, module))
    return [m.removesuffix(".__main__") for m in entries] + ([SUB_COMMANDS[module]] if module in SUB_COMMANDS else [])


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser, caller: str):
        super().__init__(parser.prog)
        self.parser, self.caller = parser, caller


def parser_of(module: str, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.ArgumentParser, str]:
    """The parser `module.main([])` builds, and the module that asked it to parse."""

    def stand_in(self, args=None, namespace=None):
        frame = sys._getframe(1)
        while frame.f_globals.get("__name__") == "argparse":
            frame = frame.f_back
        raise _Parsed(self, frame.f_globals.get("__name__", "?"))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stand_in)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stand_in)
    main = getattr(importlib.import_module(module), "main", None)
    assert callable(main), f"{module} builds an ArgumentParser but has no main(argv)"
    with pytest.raises(_Parsed) as parsed:
        main([])
    return parsed.value.parser, parsed.value.caller


def undocumented(parser: argparse.ArgumentParser, command: str = "") -> list[str]:
    """The options (and sub-commands, and their options) of `parser` without help text."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = command + ("/".join(action.option_strings) or action.dest)
        if not (action.help or "").strip():
            missing.append(name)
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for sub_command, sub_parser in action.choices.items():
                if not (helps.get(sub_command) or "").strip():
                    missing.append(f"{command}{sub_command} (sub-command)")
                missing += undocumented(sub_parser, f"{command}{sub_command} ")
    return missing


def test_the_programs_are_found():
    found = {name for module in CLI_MODULES for name in run_names(module)}
    assert {"pipeline.regions", "pipeline.attributes", "pipeline.evaluate", "model.train", "model.generate"} <= found


@pytest.mark.parametrize(("module", "command"), sorted(SUB_COMMANDS.items()))
def test_sub_command_runs_the_module(module: str, command: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *command.split(), "--help"], cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: python -m {command} "), proc.stdout[:300]


@pytest.mark.parametrize("module", CLI_MODULES)
def test_cli_names_itself_and_documents_every_option(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    names = run_names(module)
    assert names, f"{module} builds an ArgumentParser, but no `python -m` module runs its main"
    parser, caller = parser_of(module, monkeypatch)
    assert caller == module, f"{module}.main([]) parsed with a parser of {caller}"
    problems = []
    if parser.prog not in {f"python -m {name}" for name in names}:
        problems.append(f"usage names {parser.prog!r}, not " + " or ".join(repr(f"python -m {n}") for n in names)
                        + " (ArgumentParser(prog=...))")
    missing = undocumented(parser)
    if missing:
        problems.append("options without help: " + ", ".join(missing))
    assert not problems, f"{module}: " + "; ".join(problems)
