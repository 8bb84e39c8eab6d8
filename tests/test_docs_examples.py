"""The documentation's command lines run as written on the bundled model (README.md and docs/*.md).

checkpoint (models/nld-tiny) ──nemodiff-build──▶ engine dir ──nemodiff inspect / generate──▶ text

Every shell block of the README and the docs pages is read; each command that works on the bundled
model (`nemodiff-build models/nld-tiny ...`, `nemodiff inspect|generate ./engines/nld-tiny ...`) is run,
in a scratch folder laid out like the repository root, through the same Click entry points the console
scripts call. The README's links into docs/ must resolve too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemodiff.builder.cli import main as build_main
from nemodiff.cli import main as nemodiff_main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BUNDLED = re.compile(r"^(nemodiff-build models/nld-tiny |nemodiff (inspect|generate) \./engines/nld-tiny\b)")


def shell_commands(text: str) -> list[str]:
    """The commands of a page's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith("nemodiff"):
                continue  # other tools' lines (curl, hf, pip) may span lines inside quotes
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def bundled_examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for command in shell_commands(page.read_text()):
            if BUNDLED.match(command) and (page.relative_to(ROOT).as_posix(), command) not in found:
                found.append((page.relative_to(ROOT).as_posix(), command))
    return found


EXAMPLES = bundled_examples()


def test_the_docs_show_the_bundled_model_in_every_command():
    pages = {page for page, _ in EXAMPLES}
    assert {"README.md", "docs/cli.md", "docs/bundled-model.md"} <= pages
    assert sum(c.startswith("nemodiff generate") for _, c in EXAMPLES) >= 4


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory):
    """A folder laid out like the repository root (models/ at hand), with the bundled engine built once
    by the docs' own build line."""
    root = tmp_path_factory.mktemp("docs-root")
    (root / "models").symlink_to(ROOT / "models")
    build = next(c for _, c in EXAMPLES if c.startswith("nemodiff-build"))
    _run(root, build)
    return root


def _run(root: Path, command: str):
    words = shlex.split(command)
    main, args = (build_main, words[1:]) if words[0] == "nemodiff-build" else (nemodiff_main, words[1:])
    if main is build_main and (root / "engines" / "nld-tiny").exists():
        args = [*args, "--overwrite"]
    cwd = os.getcwd()
    os.chdir(root)  # the docs' paths are relative to the repository root
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, f"{command}\n{result.output}"
    return result


@pytest.mark.parametrize("page,command", EXAMPLES, ids=[f"{p}:{c[:60]}" for p, c in EXAMPLES])
def test_each_bundled_example_runs_as_written(scratch_root, page, command):
    result = _run(scratch_root, command)
    if "--json" in shlex.split(command) and "generate" in command:
        outputs = json.loads(result.stdout)
        for output in outputs if isinstance(outputs, list) else [outputs]:
            assert output["output_ids"] and output["finish_reason"] in ("eos", "length", "stop")


def test_the_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", readme) if not t.startswith("http")}
    assert "docs/cli.md" in targets and "docs/openai.md" in targets
    assert [t for t in targets if not (ROOT / t).exists()] == []
    assert len(readme.splitlines()) <= 300
