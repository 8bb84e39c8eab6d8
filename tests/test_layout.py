"""The layout of the house (docs/architecture.md): data flows one way, and the tree shows it.

Every module of the package is parsed (not imported); its imports, lazy ones included and
`if TYPE_CHECKING:` blocks excluded, are resolved to modules of the package. The tests check that
no two files import each other through any chain, that each wing imports only the wings below it
(the table below is the one in docs/architecture.md), and the size rules of the tree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

# wing -> the wings it may import (besides itself). Lazy imports count like the others.
# every wing may import these; they import nothing of ours (engine_format only the rules it re-exports)
GROUND = {"nemodiff.engine_format", "nemodiff.engine_checks", "nemodiff.device"}
ALLOWED = {
    "nemodiff.engine_format": {"nemodiff.engine_checks"},
    "nemodiff.engine_checks": set(),
    "nemodiff.device": set(),
    "nemodiff.plugins": {"nemodiff.engine_format", "nemodiff.runtime.model"},  # runtime.model: reference math only
    "nemodiff.builder": {"nemodiff", "nemodiff.engine_format", "nemodiff.plugins"},
    "nemodiff.runtime": set(),
    "nemodiff.runtime.model": {"nemodiff.engine_format", "nemodiff.plugins"},
    "nemodiff.runtime.text": set(),
    "nemodiff.runtime.images": {"nemodiff.engine_format", "nemodiff.runtime.model"},
    "nemodiff.runtime.request": {"nemodiff.runtime.text", "nemodiff.runtime.images"},
    "nemodiff.runtime.decoding": {"nemodiff.engine_format", "nemodiff.runtime.model", "nemodiff.runtime.request"},
    "nemodiff.runtime.engine": {"nemodiff.engine_format", "nemodiff.runtime.model", "nemodiff.runtime.images",
                                "nemodiff.runtime.decoding", "nemodiff.runtime.request", "nemodiff.runtime.text"},
    "nemodiff.runtime.parallel": {"nemodiff.engine_format", "nemodiff.builder", "nemodiff.runtime.model",
                                  "nemodiff.runtime.engine"},
    "nemodiff.runtime.llm": {"nemodiff.engine_format", "nemodiff.plugins", "nemodiff.runtime.model",
                             "nemodiff.runtime.text", "nemodiff.runtime.images", "nemodiff.runtime.request",
                             "nemodiff.runtime.decoding", "nemodiff.runtime.engine", "nemodiff.runtime.parallel"},
    "nemodiff.serving": {"nemodiff", "nemodiff.engine_format", "nemodiff.plugins", "nemodiff.runtime"},
    "nemodiff.bench": {"nemodiff", "nemodiff.engine_format", "nemodiff.builder", "nemodiff.plugins", "nemodiff.runtime",
                       "nemodiff.serving"},
    "nemodiff.model_repo": {"nemodiff.serving"},
    "nemodiff": {"nemodiff.runtime.llm", "nemodiff.runtime.request"},  # the public API
    "nemodiff.cli": {"nemodiff", "nemodiff.engine_format", "nemodiff.runtime", "nemodiff.serving", "nemodiff.bench"},
}
RUNTIME_WINGS = ("model", "text", "images", "decoding", "engine", "parallel")


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if name not in modules or len(path.parts) < len(modules[name].parts):
                modules[name] = path  # a sub-package mapped twice: the deeper mapping wins
    return modules


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return skipped


def _imports(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def wing_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["nemodiff", "runtime"] and len(parts) > 2:
        return ".".join(parts[:3])
    if len(parts) > 1 and parts[1] in ("builder", "plugins", "serving", "bench", "model_repo"):
        return ".".join(parts[:2])
    return module


def _allowed(source: str, target: str) -> bool:
    if target in GROUND:
        return wing_of(source) not in GROUND or target in ALLOWED[wing_of(source)]
    rules = ALLOWED[wing_of(source)]
    return any(target == rule or target.startswith(rule + ".") for rule in rules)


def test_every_wing_has_a_rule():
    assert {wing_of(m) for m in MODULES} - set(ALLOWED) == set()


def test_no_import_circle_between_files():
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_wing_imports_only_what_the_map_allows():
    wrong = sorted(f"{source} imports {target}" for source, targets in GRAPH.items() for target in targets
                   if wing_of(target) != wing_of(source) and not _allowed(source, target))
    assert wrong == []


def test_the_runtime_never_imports_serving_or_benchmarks():
    wrong = [(s, t) for s, targets in GRAPH.items() for t in targets
             if s.startswith("nemodiff.runtime") and t.startswith(("nemodiff.serving", "nemodiff.bench"))]
    assert wrong == []


def test_the_tree_shows_the_flow():
    top_runtime = sorted(p.name for p in (ROOT / "runtime").glob("*.py"))
    assert top_runtime == ["__init__.py", "llm.py", "request.py"]
    assert sorted(p.name for p in (ROOT / "runtime").iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(RUNTIME_WINGS)
    assert len(list((ROOT / "nemodiff").glob("*.py"))) <= 5
    assert not [p for p in (ROOT / "runtime").rglob("*.py") if "bench" in p.name]


@pytest.mark.parametrize("name", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_each_package_opens_with_its_place_in_the_flow(name):
    first = ast.get_docstring(ast.parse(MODULES[name].read_text()), clean=False).splitlines()[0]
    assert first.startswith("Place: ") and "checkpoint →" in first and "engine dir →" in first


def test_no_python_file_over_400_lines():
    files = [p for folder in ("nemodiff", "builder", "plugins", "runtime", "serving", "bench", "tools", "tests")
             for p in (ROOT / folder).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_design_citations_point_into_the_repository():
    """Code and docs cite docs/design.md §n; each cited section exists there."""
    design = (ROOT / "docs" / "design.md").read_text()
    sections = {line.split()[1].rstrip(".") for line in design.splitlines() if line.startswith("#")
                and len(line.split()) > 1 and line.split()[1][:1].isdigit()}
    cited = set()
    for folder in ("nemodiff", "builder", "plugins", "runtime", "serving", "bench", "tests", "docs", "tools", "models"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.is_file() and path != Path(__file__).resolve():
                text = path.read_text()
                assert "DESIGN §" not in text, f"{path} cites a design document that is not in the repository"
                cited |= set(re.findall(r"design\.md §(\d+(?:\.\d+)?)", text))
    assert cited and cited <= sections, sorted(cited - sections)
