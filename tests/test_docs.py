"""The documentation cannot drift from the code: every command in README.md and docs/*.md parses.

- a tool (``python -m xlsr.X --flags``, ``python tools/x.py``, ``python benchmarks/x.py``): its module exists, its
  ``--help`` works, and the command's own arguments parse with its argparse parser (nothing runs: the parser's
  result is caught before the tool starts);
- a trainer (``python -m xlsr.pretrain`` / ``xlsr.finetune``, alone or under ``torchrun``): its entry point is a
  hydra app, and every ``key=value`` is a key of the composed config with a value of the right type (placeholders
  such as ``CKPT`` are fine; hydra's own flags such as ``--cfg job`` are left to hydra);
- docs/configuration.md's key reference is what ``tools/config_docs.py`` generates from the config dataclasses.

Commands are read from ```bash code blocks (continuation lines joined, comments dropped, ``&&`` / ``|`` / ``;``
split) and from inline code that starts with ``python`` or ``torchrun``. A page that does not exist yet is not
scanned. A module named in the docs that another branch is still adding (``LANDING``) is skipped while it cannot
be imported, with the reason listed by ``pytest -rs``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf.errors import MissingMandatoryValue

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 150

# Modules and pages the docs name that parallel work adds; skipped (not failed) while they are not here.
LANDING: set[str] = set()
LANDING_PAGES: set[str] = set()
_LINK = re.compile(r"\]\(([^)\s]+)\)")

_FENCE = re.compile(r"^```(\w*)\s*$")
_INLINE = re.compile(r"`([^`\n]+)`")
_SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
_SEPARATORS = {"&&", "||", "|", ";"}
_PYTHONS = {"python", "python3"}
_REDIRECTION = re.compile(r"^\d*(>>?|<)(&\d+)?(.*)$")  # 2>&1, >out.txt, > out.txt: the shell's, not the tool's


def _doc_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, in a shell code block) for each line of ``path``."""
    lines, in_block, shell = [], False, False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = _FENCE.match(line.strip())
        if fence:
            in_block = not in_block
            shell = in_block and fence.group(1) in _SHELL_LANGUAGES
            continue
        lines.append((number, line, in_block and shell))
    return lines


def _split_commands(text: str) -> list[list[str]]:
    tokens = shlex.split(text, comments=True)
    commands, current, skip_target = [], [], False
    for token in tokens:
        redirection = _REDIRECTION.match(token)
        if skip_target or redirection:
            skip_target = bool(redirection) and not redirection.group(2) and not redirection.group(3)
            continue
        if token in _SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def doc_commands(path: Path) -> list[tuple[str, list[str], bool]]:
    """Every shell command of a page, as (``file:line``, tokens, whether it is inline code in the text)."""
    found = []
    pending, start = "", 0
    for number, line, shell in _doc_lines(path):
        if shell:
            if not pending:
                start = number
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            text, pending = pending + stripped, ""
            found += [(f"{path.relative_to(REPO)}:{start}", c, False) for c in _split_commands(text)]
        else:
            for span in _INLINE.findall(line):
                if span.split(" ", 1)[0] in _PYTHONS | {"torchrun"}:
                    found += [(f"{path.relative_to(REPO)}:{number}", c, True) for c in _split_commands(span)]
    return found


def invocation(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(module or script path, its arguments) of a command that runs this project's code, else None."""
    if tokens[0] in _PYTHONS and len(tokens) > 2 and tokens[1] == "-m":
        module, args = tokens[2], tokens[3:]
    elif tokens[0] in _PYTHONS and len(tokens) > 1 and tokens[1].endswith(".py"):
        module, args = tokens[1], tokens[2:]
    elif tokens[0] == "torchrun" and "-m" in tokens:
        at = tokens.index("-m")
        module, args = tokens[at + 1], tokens[at + 2:]
    else:
        return None
    if module.endswith(".py"):
        return (module, args) if module.split("/")[0] in {"tools", "benchmarks"} else None
    return (module, args) if module == "xlsr" or module.startswith("xlsr.") else None


MENTIONS: dict[str, str] = {}  # module -> where inline text first names it without arguments


def _all_invocations() -> dict[str, list[tuple[str, list[str]]]]:
    """Module or script -> the (``file:line``, arguments) of each command running it (none: only named)."""
    by_module = defaultdict(list)
    for path in DOC_FILES:
        if path.exists():
            for where, tokens, inline in doc_commands(path):
                call = invocation(tokens)
                if call is None:
                    continue
                module, args = call
                # inline text naming a module alone (`python -m xlsr.transcribe`): its --help is checked, no command
                if not (inline and not args):
                    by_module[module].append((where, args))
                else:
                    by_module.setdefault(module, [])
                    MENTIONS.setdefault(module, where)
    return dict(by_module)


INVOCATIONS = _all_invocations()


def _trainer_composer(module: str):
    """``compose_config`` of a hydra trainer (``<module>.config``), or None for a tool."""
    if module.endswith(".py") or not hasattr(importlib.import_module(module), "__path__"):
        return None  # a script or a plain module, not a package with its config
    if importlib.util.find_spec(module + ".config") is None:
        return None
    return getattr(importlib.import_module(module + ".config"), "compose_config", None)


def _load_main(module: str):
    """The ``main`` function of a tool: a module, a package's ``__main__``, or a script path."""
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_doc_script_{Path(module).stem}", REPO / module)
        loaded = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str((REPO / module).parent))
        try:
            spec.loader.exec_module(loaded)
        finally:
            sys.path.remove(str((REPO / module).parent))
        return loaded.main
    loaded = importlib.import_module(module)
    if not hasattr(loaded, "main"):
        loaded = importlib.import_module(module + ".__main__")
    return loaded.main


class _Parsed(Exception):
    """Raised by the patched ``parse_args``: the command line parsed; the tool must not run."""


def _parse_with_tool(main, args: list[str], monkeypatch) -> tuple[int | None, str]:
    """Run ``main(args)`` up to its argparse result: (exit status or None when it parsed, what it printed)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    takes_argv = bool(inspect.signature(main).parameters)
    if not takes_argv:  # main() reads sys.argv
        monkeypatch.setattr(sys, "argv", [getattr(main, "__module__", "tool"), *args])
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            main(args) if takes_argv else main()
    except _Parsed:
        return None, output.getvalue()
    except SystemExit as exit_:
        return exit_.code, output.getvalue()
    finally:
        monkeypatch.undo()
    raise AssertionError("the tool returned without parsing its command line")


def _compose_overrides(compose, overrides: list[str]) -> None:
    """Compose a trainer's config with these overrides, filling required keys the command leaves out."""
    overrides = list(overrides)
    for _ in range(5):
        try:
            compose(overrides)
            return
        except MissingMandatoryValue as missing:
            key = missing.full_key
            assert key and not any(o.startswith(key + "=") for o in overrides), str(missing)
            overrides.append(f"{key}=PLACEHOLDER")
    raise AssertionError(f"could not compose with {overrides}")


def _hydra_overrides(args: list[str]) -> list[str]:
    """The ``key=value`` words of a trainer command (hydra's own flags such as ``--cfg job`` dropped)."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp"}:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def test_docs_have_commands():
    """The scanner finds the commands of the pages (a broken scanner would make the other tests vacuous)."""
    assert {"xlsr.pretrain", "xlsr.finetune", "xlsr.transcribe", "xlsr.manifest",
            "tools/convert_fairseq.py"} <= set(INVOCATIONS)


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("module", sorted(INVOCATIONS))
def test_documented_commands_parse(module, monkeypatch):
    uses = INVOCATIONS[module]
    first = uses[0][0] if uses else MENTIONS[module]
    if module.endswith(".py"):
        assert (REPO / module).exists(), f"{first}: {module} does not exist"
    else:
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            if module in LANDING:
                pytest.skip(f"{module} (named in {first}) is not in this checkout yet")
            pytest.fail(f"{first}: python -m {module}: no such module")

    compose = _trainer_composer(module)
    if compose is not None:
        # its entry point hands the command line to hydra (its --help: tests/test_classification_training.py);
        # composing the config with the documented overrides is what hydra parses
        for where, args in uses:
            overrides = _hydra_overrides(args)
            try:
                _compose_overrides(compose, overrides)
            except Exception as error:  # hydra's and omegaconf's errors name the key
                pytest.fail(f"{where}: {module} {' '.join(overrides)}\n{type(error).__name__}: {error}")
        return

    main = _load_main(module)
    assert not hasattr(main, "__wrapped__"), \
        f"{module} is a hydra app without {module}.config.compose_config: add one so its documented keys are checked"
    status, printed = _parse_with_tool(main, ["--help"], monkeypatch)
    assert status == 0 and "usage:" in printed, f"{module} --help: exit {status}\n{printed[-2000:]}"
    for where, args in uses:
        status, printed = _parse_with_tool(main, args, monkeypatch)
        expected = 0 if {"-h", "--help"} & set(args) else None  # a documented --help exits 0
        assert status == expected, f"{where}: {module} {' '.join(args)}\n{printed[-2000:]}"
    # a tool's pretraining overrides (python -m xlsr.demo ... optim.lr=1e-3) are pretraining keys
    if module == "xlsr.demo":
        from xlsr.pretrain.config import compose_config
        for where, args in uses:
            overrides = [a for a in args if "=" in a and not a.startswith("-")]
            if overrides:
                _compose_overrides(compose_config, overrides)


def test_configuration_page_is_generated():
    """docs/configuration.md's key reference equals tools/config_docs.py's output, and every key has a docstring."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import config_docs
    finally:
        sys.path.remove(str(REPO / "tools"))
    reference, undocumented = config_docs.generate()
    assert not undocumented, f"config keys without a docstring: {undocumented}"
    page = config_docs.PAGE.read_text(encoding="utf-8")
    assert page == config_docs.page_with(reference, page), \
        "docs/configuration.md is out of date: run python tools/config_docs.py"


def test_relative_links_point_to_files():
    """Every relative link of README.md and docs/*.md names a file or folder of the repository."""
    missing, landing = [], []
    for path in DOC_FILES:
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target in _LINK.findall(line):
                if target.startswith(("http://", "https://", "#", "mailto:")):
                    continue
                resolved = (path.parent / target.split("#", 1)[0]).resolve()
                if resolved.exists():
                    continue
                name = resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else target
                (landing if name in LANDING_PAGES else missing).append(f"{path.relative_to(REPO)}:{number}: {target}")
    assert not missing, "links to nothing:\n" + "\n".join(missing)
    if landing:
        pytest.skip(f"{len(landing)} link(s) to pages not in this checkout yet, e.g. {landing[0]}")
