"""The layers, bottom to top, and the import directions between them (docs/layers.md): a module imports only from
its own layer or the layers below it."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (layer, its modules by name prefix), bottom first.
LAYERS = (
    ("builder", ("evit",)),
    ("substrate", ("experiments.cache_keys", "experiments.claims", "experiments.cli", "experiments.data", "experiments.distillation",
                   "experiments.launch", "experiments.models", "experiments.paths", "experiments.timing",
                   "experiments.train", "experiments.zoo")),
    ("analyses", ("analysis",)),
    ("orchestration", ("experiments.benchmark", "experiments.family", "experiments.peer_pruning",
                       "experiments.prune_study", "experiments.reproduce", "experiments.support_matrix")),
)
PACKAGES = ("evit", "experiments", "analysis")


def layer_of(module: str) -> int | None:
    """The layer index of a project module (None for a third-party one)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    if module in PACKAGES:  # a package's own __init__ (nearly empty): the lowest layer any of its modules is in
        return min(i for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if p.split(".")[0] == module)
    matches = [i for i, (_, prefixes) in enumerate(LAYERS)
               for p in prefixes if module == p or module.startswith(p + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS and docs/layers.md"
    return matches[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, package: str) -> set[str]:
    """Every module a source in `package` imports, anywhere in it (deferred imports in functions too), relative
    imports resolved, `from package import module` counted as importing the module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def package_of(path: Path) -> str:
    return module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]


SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_module_has_a_layer():
    assert SOURCES and all(layer_of(module_name(p)) is not None for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_or_sideways(path):
    own = layer_of(module_name(path))
    upward = [f"{m} ({LAYERS[layer_of(m)][0]})" for m in sorted(imports(path.read_text(), package_of(path)))
              if layer_of(m) is not None and layer_of(m) > own]
    assert not upward, f"{module_name(path)} ({LAYERS[own][0]}) imports from above: {', '.join(upward)}"


def test_the_walk_sees_deferred_relative_and_from_imports():
    source = "from .config import X\ndef f():\n    from experiments import reproduce\n    import analysis.op_profile\n"
    found = imports(source, "evit")
    assert {"evit.config", "experiments.reproduce", "analysis.op_profile"} <= found
    assert layer_of("experiments.reproduce") > layer_of("evit.config")
