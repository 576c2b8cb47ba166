"""The package's shape (issue 35): three floors, each importing only from the floors below, no circle, and each
CLI subcommand's stage found at defuse/stages/<name> in one hop."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "defuse"
TOP = {"defuse", "defuse.__main__", "defuse.cli", "defuse.pipeline", "defuse.scanner", "defuse.callbacks"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, dict[str, int]]:
    """module -> {defuse module it imports (at load time or inside a function): line}; TYPE_CHECKING blocks,
    which never run, are left out."""
    modules = {_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
            node.test) for n in ast.walk(node)}
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        edges = graph.setdefault(module, {})
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base] * bool(base))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.setdefault(target, node.lineno)
    return graph


def _floor(module: str) -> int:
    if module in TOP:
        return 2
    return 1 if module.startswith("defuse.stages") else 0


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_no_module_imports_from_a_floor_above_it():
    graph = _imports()
    upward = [f"{m} -> {t} (line {line})" for m, edges in graph.items() for t, line in edges.items()
              if _floor(t) > _floor(m) and not (m == "defuse" and t == "defuse.version")]
    assert upward == []


def test_no_stage_imports_another_stage():
    graph = _imports()
    crossing = [f"{m} -> {t} (line {line})" for m, edges in graph.items() for t, line in edges.items()
                if _stage(m) and _stage(t) and _stage(m) != _stage(t)]
    assert crossing == []


def test_no_circle_of_imports():
    """Edges from a package to its own submodules are left out: Python imports a package before its submodules,
    so a package re-exporting them (``defuse.label_issues``) is not a circle."""
    graph = {m: {t for t in edges if not t.startswith(m + ".")} for m, edges in _imports().items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


@pytest.mark.parametrize("name", [c for c in __import__("defuse.cli", fromlist=["SUBCOMMANDS"]).SUBCOMMANDS
                                  if c != "run"])
def test_each_subcommand_is_found_at_stages_name_in_one_hop(name):
    module = PACKAGE / "stages" / name.replace("-", "_")
    assert module.with_suffix(".py").is_file() or (module / "__init__.py").is_file()


def test_each_stage_is_declared_beside_its_adapter_at_stages_name():
    from defuse.pipeline import STAGES

    for stage in STAGES:
        assert stage.run.__module__ == f"defuse.stages.{stage.name.replace('-', '_')}", stage.name


def test_every_public_name_resolves_where_the_package_says_it_lives():
    """``defuse.X`` is imported on first use from the module ``defuse._EXPORTS`` names: a module that moved must
    move there too, or the name fails only when a user reaches for it."""
    import defuse

    missing = []
    for name in defuse.__all__:
        try:
            getattr(defuse, name)
        except (AttributeError, ImportError) as err:
            missing.append(f"{name}: {err}")
    assert missing == [] and len(defuse.__all__) >= 40
