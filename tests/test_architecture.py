"""The package's shape: the layer contract (import-linter, configured in pyproject.toml), no import
cycles between modules, and no module over MAX_LINES lines unless its docstring says why.

Imports inside functions and under TYPE_CHECKING count everywhere here: a lazy import still makes
the importer depend on the imported module, and a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import missing

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "liveperceiver"
MAX_LINES = 600
LONG_FILE_REASON = "Long file:"  # a module docstring line starting so states why a module is longer
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


# --------------------------------------------------------------------------- the layer contract


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the contracts in `root`/pyproject.toml, on the package in `root`."""
    if importlib.util.find_spec("importlinter") is None:
        missing("import-linter is not installed (pip install -e '.[test]')")
    command = [sys.executable, "-c", LINT, "--no-cache"]  # it reads the contracts from root/pyproject.toml
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "broken" not in result.stdout.replace("0 broken", "")


def test_a_wrong_way_import_breaks_the_contract(tmp_path):
    """The check can fail: on a copy of the package where core imports live (inside a function) and
    live imports the test harness, lint-imports fails and names both contracts and both imports."""
    shutil.copytree(PACKAGE, tmp_path / "liveperceiver", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "liveperceiver" / "core" / "vocab.py").open("a") as file:
        file.write("\n\ndef _wrong_way():\n    from liveperceiver.live import settings\n\n    return settings\n")
    with (tmp_path / "liveperceiver" / "live" / "recorder.py").open("a") as file:
        file.write("\n\ndef _harness():\n    import liveperceiver.testing.jack\n")
    result = lint_imports(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "core < inference < live and training < ui < tools < cli BROKEN" in output, output
    assert "the product never imports the test harness or the tools BROKEN" in output, output
    assert "liveperceiver.core.vocab -> liveperceiver.live.settings" in output, output
    assert "liveperceiver.live.recorder -> liveperceiver.testing.jack" in output, output


# --------------------------------------------------------------------------- import cycles


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """{module: {module it imports: line of the first such import}} over the package in `root`,
    every import statement counted wherever it stands; imports from outside the package are left out."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {name: {} for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from package import module` depends on that module, `from module import name` on the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                if target in files and target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def describe_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    members = set(component)
    imports = [
        f"{source} imports {target} (line {line})"
        for source in component
        for target, line in sorted(graph[source].items())
        if target in members
    ]
    return "; ".join(imports)


def test_no_import_cycles_between_modules():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and graph["liveperceiver.cli"]  # the walk sees the package and its imports
    found = cycles(graph)
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(describe_cycle(graph, c) for c in found)


def test_a_lazy_import_cycle_is_found(tmp_path):
    """The cycle check can fail: two modules that import each other, one of them inside a function."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import helper\n")
    (package / "b.py").write_text("def helper():\n    from pkg import a\n\n    return a\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert describe_cycle(graph, ["pkg.a", "pkg.b"]) == "pkg.a imports pkg.b (line 1); pkg.b imports pkg.a (line 2)"


# --------------------------------------------------------------------------- module sizes


def long_modules(root: Path) -> list[str]:
    """Modules over MAX_LINES lines whose docstring does not say why, as `path (N lines)`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        docstring = ast.get_docstring(ast.parse(text)) or ""
        reasoned = any(line.strip().startswith(LONG_FILE_REASON) for line in docstring.splitlines())
        if lines > MAX_LINES and not reasoned:
            found.append(f"{path.relative_to(root.parent)} ({lines} lines)")
    return found


def test_no_module_over_the_size_limit_without_a_reason():
    found = long_modules(PACKAGE)
    assert not found, (
        f"modules over {MAX_LINES} lines: split them into modules of one stage or thread each, or say why "
        f"one file is better in a line of the module docstring starting {LONG_FILE_REASON!r}:\n  " + "\n  ".join(found)
    )


def test_a_long_module_needs_its_reason(tmp_path):
    """The size check can fail, and a stated reason is accepted."""
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"x{i} = {i}" for i in range(MAX_LINES))
    (package / "long.py").write_text(f'"""A long module."""\n{body}\n')
    (package / "reasoned.py").write_text(f'"""A long module.\n\n{LONG_FILE_REASON} a table kept whole.\n"""\n{body}\n')
    (package / "short.py").write_text('"""Short."""\n')
    assert long_modules(package) == [f"pkg/long.py ({MAX_LINES + 1} lines)"]
