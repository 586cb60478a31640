"""The layers are folders, bottom to top (docs/layers.md): a module imports only from its own folder's layer or the
layers below it. `evit/` holds two levels, so its sub-package `evit/builder/` is a layer of its own."""
import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (layer, its folder), bottom first. A module's layer is the deepest folder that holds it.
LAYERS = (
    ("builder", "evit/builder"),
    ("library", "evit"),
    ("analyses", "analysis"),
    ("studies", "experiments"),
)
PACKAGES = tuple(sorted({folder.split("/")[0] for _, folder in LAYERS}))


def layer_of(module: str) -> int | None:
    """The layer index of a project module (None for a third-party one): that of the deepest layer folder
    holding it."""
    path = module.replace(".", "/")
    holding = [(len(folder), i) for i, (_, folder) in enumerate(LAYERS)
               if path == folder or path.startswith(folder + "/")]
    return max(holding)[1] if holding else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_nodes(tree: ast.AST):
    """The import statements of a tree, anywhere in it but under `if TYPE_CHECKING:` (annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not is_type_checking(node):
            yield from import_nodes(node)


def imports(source: str, package: str) -> set[str]:
    """Every module a source in `package` imports, anywhere in it (deferred imports in functions too), relative
    imports resolved, `from package import module` counted as importing the module."""
    found = set()
    for node in import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of `module` (whose text is `source`) that reach a layer above its own, as 'module (layer)'."""
    own = layer_of(module)
    package = module if is_package else module.rpartition(".")[0]
    return [f"{m} ({LAYERS[layer_of(m)][0]})" for m in sorted(imports(source, package))
            if layer_of(m) is not None and layer_of(m) > own]


SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_code_folder_is_a_layer():
    """Every package the project installs is a layer's folder, and every module lies in one."""
    installed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {name.rstrip("*") for name in installed["include"]} == set(PACKAGES)
    assert SOURCES and all(layer_of(module_name(p)) is not None for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_or_sideways(path):
    module = module_name(path)
    upward = upward_imports(path.read_text(), module, is_package=path.name == "__init__.py")
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports from above: {', '.join(upward)}"


@pytest.mark.parametrize("source, module, expected", [
    # a deferred absolute import from the builder up into the studies
    ("def f():\n    from experiments import reproduce\n", "evit.builder.config",
     ["experiments (studies)", "experiments.reproduce (studies)"]),
    # a relative import two levels up, out of the builder into the library beside it
    ("from ..zoo import load_model\n", "evit.builder.convert", ["evit.zoo (library)", "evit.zoo.load_model (library)"]),
    # `import evit` from the builder is the library's __init__, above the builder
    ("import evit\n", "evit.builder.efficientvit", ["evit (library)"]),
    # an analysis importing a study, inside a function
    ("def g():\n    import experiments.prune_study\n", "analysis.op_profile", ["experiments.prune_study (studies)"]),
    # down and sideways: none
    ("from .config import X\nimport torch\nfrom evit.builder import io\n", "evit.builder.convert", []),
    ("from evit import zoo\nfrom analysis import op_profile\n", "experiments.benchmark", []),
])
def test_the_check_finds_a_planted_upward_import(source, module, expected):
    assert upward_imports(source, module) == expected


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` (module -> the modules it imports) as [a, b, ..., a], or [] when it has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def library_import_graph() -> dict[str, set[str]]:
    """The library's modules and the library modules each imports (an imported name that is not a module, as in
    `from evit.zoo import load_model`, counts as its module)."""
    library = LAYERS.index(next(layer for layer in LAYERS if layer[0] == "library"))
    paths = {module_name(p): p for p in SOURCES if layer_of(module_name(p)) == library}
    return {module: {m for m in imports(path.read_text(), module if path.name == "__init__.py"
                                         else module.rpartition(".")[0]) if m in paths and m != module}
            for module, path in paths.items()}


def test_the_library_imports_without_a_loop():
    """docs/layers.md gives the library's import order; a loop would make it depend on which module comes first."""
    graph = library_import_graph()
    assert "evit.zoo" in graph["evit.launch"] and "evit.weights" in graph["evit.train"]  # the graph sees imports
    cycle = import_cycle(graph)
    assert not cycle, f"the library's imports loop: {' -> '.join(cycle)}"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, []),  # a diamond is no loop
    ({"a": {"a"}}, ["a", "a"]),
])
def test_the_cycle_check_finds_a_planted_loop(graph, expected):
    assert import_cycle(graph) == expected


def test_imports_under_type_checking_are_not_imports():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evit import zoo\nimport evit.data\n"
    assert imports(source, "evit") == {"typing", "typing.TYPE_CHECKING", "evit.data"}
