"""The package's layering, read from its source: no import cycle, and no import from a lower layer to a higher one.

The import graph is built with ``ast`` from every module of ``personaplex/``: imports at the top of a module and
inside functions alike (an import inside a function is still a dependency, only a later one), relative and
absolute, ``from package import name`` counting as an import of ``package.name`` when that is a module, and
``importlib.import_module("literal")``. ``docs/ARCHITECTURE.md`` draws the same layers.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "personaplex"

COMMANDS = ("personaplex.offline", "personaplex.client", "personaplex.loadtest", "personaplex.server.serve",
            "personaplex.scaleout.cli", "personaplex.eval.cli")

# Lowest first. A module belongs to the layer of the longest prefix below that names it (the package's own
# ``__init__``, "personaplex", names only itself); a module may import from its own layer and any layer before it,
# never from a later one.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation: errors, presets, text, Ogg pages", (
        "personaplex", "personaplex.errors", "personaplex.config", "personaplex.text", "personaplex.startup",
        "personaplex.compile_cache", "personaplex.compiled", "personaplex.cuda_graph", "personaplex.assets_data",
        "personaplex.ogg", "personaplex.devices",
    )),
    ("model: codec, LM, weights, personas, engine, loading", (
        "personaplex.layers", "personaplex.codec", "personaplex.lm", "personaplex.checkpoint", "personaplex.model_assets",
        "personaplex.random_weights", "personaplex.demo", "personaplex.audio", "personaplex.persona",
        "personaplex.persona_store", "personaplex.engine", "personaplex.deploy", "personaplex.loading",
    )),
    ("application: the model, sampling and recordings from flags; logging and exit status", (
        "personaplex.app",
    )),
    ("live serving: the conversation hub", (
        "personaplex.serving",
    )),
    ("front ends: framework-neutral protocol handlers and their codecs", (
        "personaplex.frontends",
    )),
    ("servers, clients, evaluation: aiohttp, Ray Serve, protocol clients, benchmarks", (
        "personaplex.server", "personaplex.scaleout", "personaplex.chat_client", "personaplex.realtime_client",
        "personaplex.eval",
    )),
    ("commands: one module per subcommand, imported by nothing but the entry points", COMMANDS),
    ("entry points: the command table and python -m", (
        "personaplex.cli", "personaplex.__main__", "personaplex.server.__main__",
        "personaplex.server.front_end_worker",  # a front-end process of personaplex serve --front-end-processes
    )),
)


# Known exceptions, each with its reason; every one must still exist (see the test below), so that a fixed one
# leaves this list.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    where: str  # file:line of the import

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  ({self.where})"


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, whether it is a package's ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if not level:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imported_names(node: ast.AST, module: str, is_package: bool, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = absolute(module, is_package, node.level, node.module)
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        name = node.args[0].value
        level = len(name) - len(name.lstrip("."))
        return [absolute(module, is_package, level, name.lstrip(".") or None)]
    return []


def import_graph() -> list[Edge]:
    known = modules()
    edges = set()
    for module, (path, is_package) in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for name in imported_names(node, module, is_package, known):
                while name and name not in known:  # an imported class or function: its module
                    name = name.rpartition(".")[0]
                if name and name != module:
                    where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    edges.add(Edge(module, name, where))
    return sorted(edges, key=lambda e: (e.source, e.target, e.where))


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "personaplex"
            if (module == prefix or inside) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def cycles(nodes: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    successors = defaultdict(set)
    for a, b in edges:
        successors[a].add(b)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(successors[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found


def component(module: str) -> str:
    """The top-level part of the package a module belongs to: ``personaplex.server.app`` -> ``personaplex.server``."""
    return ".".join(module.split(".")[:2])


def describe_cycles(found: list[list[str]], edges: list[Edge], key) -> str:
    lines = []
    for members in found:
        inside = set(members)
        lines.append(f"cycle of {len(members)}: {', '.join(members)}")
        lines += [f"    {e}" for e in edges if key(e.source) in inside and key(e.target) in inside
                  and key(e.source) != key(e.target)]
    return "\n".join(lines)


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_import_cycle_between_modules():
    edges = import_graph()
    found = cycles(list(modules()), [(e.source, e.target) for e in edges])
    assert not found, "import cycles between modules:\n" + describe_cycles(found, edges, lambda m: m)


def test_no_import_cycle_between_parts_of_the_package():
    """Cycles between the package's parts (``server`` <-> ``integrations``), which no module-level cycle shows."""
    edges = import_graph()
    parts = sorted({component(m) for m in modules()})
    found = cycles(parts, [(component(e.source), component(e.target)) for e in edges
                           if component(e.source) != component(e.target) and component(e.target) != "personaplex"])
    assert not found, "import cycles between parts of the package:\n" + describe_cycles(found, edges, component)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [e for e in import_graph() if layer_of(e.target) > layer_of(e.source)
              and (e.source, e.target) not in ALLOWED]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(
        f"    {e}   [{LAYERS[layer_of(e.source)][0].split(':')[0]} -> {LAYERS[layer_of(e.target)][0].split(':')[0]}]"
        for e in upward)


def test_nothing_but_an_entry_point_imports_a_command():
    entry = len(LAYERS) - 1
    into_commands = [e for e in import_graph() if e.target in COMMANDS and layer_of(e.source) != entry
                     and (e.source, e.target) not in ALLOWED]
    assert not into_commands, "commands imported by other modules:\n" + "\n".join(f"    {e}" for e in into_commands)


def test_a_new_module_must_be_given_a_layer():
    with pytest.raises(AssertionError, match="personaplex.newcomer is in no layer"):
        layer_of("personaplex.newcomer")
    assert layer_of("personaplex.server.app") < layer_of("personaplex.server.serve") < layer_of("personaplex.cli")


def test_every_known_exception_is_still_needed():
    edges = {(e.source, e.target) for e in import_graph()}
    stale = [f"{a} -> {b}" for a, b in ALLOWED if (a, b) not in edges]
    assert not stale, "no longer imported: remove from ALLOWED: " + ", ".join(stale)


@pytest.mark.parametrize("source, expected", [
    ("from .ogg import OggPage", ["personaplex.x.ogg"]),
    ("from . import ogg, missing", ["personaplex.x.ogg", "personaplex.x"]),
    ("from .. import errors", ["personaplex.errors"]),
    ("def f():\n    from ..errors import PersonaplexError", ["personaplex.errors"]),
    ("import personaplex.x.ogg as o", ["personaplex.x.ogg"]),
    ("import importlib\nimportlib.import_module('.ogg', __package__)", ["personaplex.x.ogg"]),
])
def test_the_graph_sees_every_form_of_import(source, expected):
    known = {"personaplex": 0, "personaplex.errors": 0, "personaplex.x": 0, "personaplex.x.ogg": 0}
    names = [n for node in ast.walk(ast.parse(source)) for n in imported_names(node, "personaplex.x.app", False, known)
             if n.startswith("personaplex")]
    assert names == expected
