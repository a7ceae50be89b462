"""The layout's contract: sub-packages depend one way, the core never imports the UI, the README shows the tree.

Imports inside functions count: a lazy import hides a cycle from Python, not from the design.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "shrink_core"
# Lower layers first; a module may import its own layer and the layers before it, never a later one.
LAYERS = ["base", "model", "evaluation", "perf", "plan", "compression", "results", "runtime", "sensitivity", "distill",
          "cli"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every shrink_core/ui/streamlit module `path` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the tree uses absolute imports"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path) if m in files and m != name}
        graph[name] |= {m for m in _imports(path) if m.split(".")[0] in ("ui", "streamlit", "app_pages")}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("errors", "paths", "formats", "__main__"):
        return "base"
    return parts[1]


def test_core_never_imports_ui_or_streamlit():
    bad = sorted((m, d) for m, deps in _graph().items() for d in deps if d.split(".")[0] != "shrink_core")
    assert bad == []


def test_every_subpackage_is_in_a_layer():
    assert {_layer(m) for m in _graph() if m != "shrink_core.__main__"} <= set(LAYERS)


def test_dependencies_point_one_way():
    upward = sorted((m, d) for m, deps in _graph().items() for d in deps
                    if d.startswith("shrink_core") and m != "shrink_core.__main__"
                    and LAYERS.index(_layer(d)) > LAYERS.index(_layer(m)))
    assert upward == []


def test_no_import_cycle_between_modules():
    graph = {m: {d for d in deps if d.startswith("shrink_core")} for m, deps in _graph().items()}
    # A package's __init__ only re-exports its own modules; an edge into it stands for the module it re-exports.
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep == node.rsplit(".", 1)[0] and node.endswith(tuple(graph)):  # a module importing its own package
                continue
            if state.get(dep) == 1:
                cycle.extend(trail[trail.index(dep):] + [dep] if dep in trail else [node, dep])
                return True
            if state.get(dep) is None and visit(dep, trail + [dep]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, [module]):
            break
    assert cycle == []


def test_readme_layout_matches_the_subpackages():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = re.findall(r"^  ([a-z_]+)/", block, flags=re.MULTILINE)  # the indented lines under shrink_core/
    packages = [p.name for p in CORE.iterdir() if (p / "__init__.py").exists()]
    assert sorted(named) == sorted(packages)
    assert named == [layer for layer in LAYERS if layer != "base"]  # listed in dependency order


def _class_definitions(name: str) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in CORE.rglob("*.py")
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ClassDef) and node.name == name]


def test_one_definition_each_of_the_recipe_the_menu_and_the_weight_format():
    assert _class_definitions("CalibrationRecipe") == ["shrink_core/evaluation/calibration.py"]
    assert _class_definitions("Setting") == ["shrink_core/plan/menu.py"]
    assert _class_definitions("WeightSpec") == ["shrink_core/plan/spec.py"]
    # byte counts of the packed format live in one module; everything else imports them
    definers = [str(p.relative_to(ROOT)) for p in CORE.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.FunctionDef) and node.name == "packed_weight_bytes"]
    assert definers == ["shrink_core/formats.py"]
    assert _class_definitions("WeightFormat") == ["shrink_core/formats.py"]
    assert _class_definitions("QuantSpec") == []  # the roofline's old copy of the format


def test_the_cli_starts_without_torch():
    import subprocess
    import sys

    code = ("import sys; from shrink_core.cli.entry import build_parser; build_parser(); "
            "print('torch' in sys.modules, 'streamlit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_tree_is_lint_clean():
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "--output-format", "concise", str(ROOT)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout[-3000:]
