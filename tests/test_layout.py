"""The layout of the house (docs/architecture.md): data flows one way, and the tree shows it.

Every module of the package (the folder nemodiff/ is the import path) is parsed, not imported; its
imports, lazy ones and `if TYPE_CHECKING:` blocks included, are resolved to modules of the package.
The tests check that no two modules import each other through any chain (package faces aside), that
no import runs back up the flow (ground → plugins → builder → runtime → serving → bench), that each
wing imports only what the table below allows (the one in docs/architecture.md), and the size rules
of the tree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nemodiff"

# The flow, lowest first: a module may import its own wing and the wings before it, never one after.
# The ground modules sit below all (every wing may import them; they import nothing of ours but each
# other, engine_format only the rules it re-exports).
GROUND = {"nemodiff.engine_format", "nemodiff.engine_checks", "nemodiff.device", "nemodiff.cuda_driver",
          "nemodiff.sharding"}
FLOW = ["ground", "nemodiff.plugins", "nemodiff.builder", "nemodiff.runtime", "nemodiff.serving", "nemodiff.bench",
        "top"]
# wing -> the wings it may import (besides itself). Lazy imports count like the others.
ALLOWED = {
    "nemodiff.engine_format": {"nemodiff.engine_checks"},
    "nemodiff.engine_checks": set(),
    "nemodiff.device": set(),
    "nemodiff.cuda_driver": {"nemodiff.device"},
    "nemodiff.sharding": set(),
    "nemodiff.plugins": GROUND,
    "nemodiff.builder": GROUND | {"nemodiff.plugins"},
    "nemodiff.runtime": set(),
    "nemodiff.runtime.model": GROUND | {"nemodiff.plugins"},
    "nemodiff.runtime.text": GROUND,
    "nemodiff.runtime.images": GROUND | {"nemodiff.plugins", "nemodiff.runtime.model"},
    "nemodiff.runtime.request": {"nemodiff.runtime.text", "nemodiff.runtime.images"},
    "nemodiff.runtime.decoding": GROUND | {"nemodiff.runtime.model", "nemodiff.runtime.request"},
    "nemodiff.runtime.engine": GROUND | {"nemodiff.runtime.model", "nemodiff.runtime.images",
                                         "nemodiff.runtime.decoding", "nemodiff.runtime.request",
                                         "nemodiff.runtime.text"},
    "nemodiff.runtime.parallel": GROUND | {"nemodiff.runtime.model", "nemodiff.runtime.engine"},
    "nemodiff.runtime.llm": GROUND | {"nemodiff.plugins", "nemodiff.runtime.model", "nemodiff.runtime.text",
                                      "nemodiff.runtime.images", "nemodiff.runtime.request",
                                      "nemodiff.runtime.decoding", "nemodiff.runtime.engine",
                                      "nemodiff.runtime.parallel"},
    "nemodiff.serving": GROUND | {"nemodiff.plugins", "nemodiff.runtime"},
    "nemodiff.bench": GROUND | {"nemodiff", "nemodiff.builder", "nemodiff.plugins", "nemodiff.runtime", "nemodiff.serving"},
    "nemodiff.model_repo": {"nemodiff.serving"},
    "nemodiff": {"nemodiff.engine_format", "nemodiff.runtime.llm", "nemodiff.runtime.request"},  # the public API
    "nemodiff.cli": GROUND | {"nemodiff", "nemodiff.runtime", "nemodiff.serving", "nemodiff.bench"},
}
RUNTIME_WINGS = ("model", "text", "images", "decoding", "engine", "parallel")


def _modules() -> dict[str, Path]:
    """Every module of the package, named by its path: the folder is the import path."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules `name` imports: top-level, lazy and `if TYPE_CHECKING:` imports alike."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
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


def stage_of(module: str) -> int:
    """Its place in FLOW: the ground modules lowest, then plugins ... bench, the package's faces on top."""
    if module in GROUND:
        return 0
    if module == "nemodiff":
        return FLOW.index("nemodiff.runtime")  # the public API face: LLM and SamplingParams, re-exported
    for index, stage in enumerate(FLOW):
        if module == stage or module.startswith(stage + "."):
            return index
    return len(FLOW) - 1  # nemodiff (the public API), nemodiff.cli, model_repo: nothing imports them


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle the depth-first walk meets, package faces (`__init__` modules) left out."""
    faces = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    state: dict[str, int] = {}
    found = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target in faces:
                continue
            if state.get(target) == 1:
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state and module not in faces:
            visit(module, [])
    return found


def imports_up_the_flow(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} imports {target}" for source, targets in graph.items() for target in targets
                  if stage_of(target) > stage_of(source))


def _allowed(source: str, target: str) -> bool:
    rules = ALLOWED[wing_of(source)]
    return any(target == rule or target.startswith(rule + ".") for rule in rules)


def test_every_wing_has_a_rule():
    assert {wing_of(m) for m in MODULES} - set(ALLOWED) == set()


def test_the_folder_is_the_import_path():
    """No package-dir mapping: every module of the package lives under nemodiff/ at its dotted path."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in setuptools and setuptools["packages"] == {"find": {"include": ["nemodiff*"]}}
    assert not [name for name in ("builder", "plugins", "runtime", "serving", "bench", "model_repo")
                if (ROOT / name).exists()]
    assert MODULES["nemodiff.runtime.llm"] == PACKAGE / "runtime" / "llm.py"


def test_no_import_circle_between_modules():
    found = circles(GRAPH)
    assert found == [], "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_import_runs_back_up_the_flow():
    assert imports_up_the_flow(GRAPH) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The two rules above, on graphs that break them: a circle through a lazy import, the kernels
    reaching into the runtime, and the runtime reaching into the builder."""
    assert circles({"nemodiff.engine_format": {"nemodiff.engine_checks"},
                    "nemodiff.engine_checks": {"nemodiff.engine_format"}})
    assert imports_up_the_flow({"nemodiff.plugins.norm": {"nemodiff.runtime.model.layers"}}) == [
        "nemodiff.plugins.norm imports nemodiff.runtime.model.layers"]
    assert not _allowed("nemodiff.runtime.parallel.comm", "nemodiff.builder.shard")  # serve time needs no builder
    assert imports_up_the_flow({"nemodiff.builder.build": {"nemodiff.serving.cli"}})
    assert imports_up_the_flow({"nemodiff.sharding": {"nemodiff.plugins.spec"}})
    assert not imports_up_the_flow({"nemodiff.runtime.model.layers": {"nemodiff.plugins.reference"}})
    source = "def f():\n    from nemodiff.runtime.model import rope\n"
    lazy = ast.parse(source)
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(lazy))  # lazy imports are walked too


def test_each_wing_imports_only_what_the_map_allows():
    wrong = sorted(f"{source} imports {target}" for source, targets in GRAPH.items() for target in targets
                   if wing_of(target) != wing_of(source) and not _allowed(source, target))
    assert wrong == []


def test_the_runtime_never_imports_serving_or_benchmarks():
    wrong = [(s, t) for s, targets in GRAPH.items() for t in targets
             if s.startswith("nemodiff.runtime") and t.startswith(("nemodiff.serving", "nemodiff.bench"))]
    assert wrong == []


def test_the_tree_shows_the_flow():
    runtime = PACKAGE / "runtime"
    assert sorted(p.name for p in runtime.glob("*.py")) == ["__init__.py", "llm.py", "request.py"]
    assert sorted(p.name for p in runtime.iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(RUNTIME_WINGS)
    ground = {f"nemodiff.{p.stem}" for p in PACKAGE.glob("*.py")} - {"nemodiff.__init__", "nemodiff.cli"}
    assert ground == GROUND
    assert not [p for p in runtime.rglob("*.py") if "bench" in p.name]


@pytest.mark.parametrize("name", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_each_package_opens_with_its_place_in_the_flow(name):
    first = ast.get_docstring(ast.parse(MODULES[name].read_text()), clean=False).splitlines()[0]
    assert first.startswith("Place: ") and "checkpoint →" in first and "engine dir →" in first


def test_no_python_file_over_400_lines():
    files = [p for folder in ("nemodiff", "tools", "tests") for p in (ROOT / folder).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_design_citations_point_into_the_repository():
    """Code and docs cite docs/design.md §n; each cited section exists there."""
    design = (ROOT / "docs" / "design.md").read_text()
    sections = {line.split()[1].rstrip(".") for line in design.splitlines() if line.startswith("#")
                and len(line.split()) > 1 and line.split()[1][:1].isdigit()}
    cited = set()
    for folder in ("nemodiff", "tests", "docs", "tools", "models"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.is_file() and path != Path(__file__).resolve():
                text = path.read_text()
                assert "DESIGN §" not in text, f"{path} cites a design document that is not in the repository"
                cited |= set(re.findall(r"design\.md §(\d+(?:\.\d+)?)", text))
    assert cited and cited <= sections, sorted(cited - sections)
