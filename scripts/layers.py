"""knhk_memory's import graph, collapsed into its layers.

    python3 scripts/layers.py                # the layer picture docs/architecture.md shows
    python3 scripts/layers.py --check        # the same, and exit 1 on an upward import,
                                            # a module in no layer, or a facade name used below the CLI
    python3 scripts/layers.py --update-doc   # write the picture into docs/architecture.md

The layers are the ones `lint-imports` checks: the first contract of
``[tool.importlinter]`` in pyproject.toml, top to bottom. The imports are read
from the source with :mod:`ast` (every ``import`` statement, in functions and
under ``TYPE_CHECKING`` too, as import-linter counts them), so the picture also
shows what import-linter cannot see: the compiled modules (``knhk_memory._native``,
``knhk_memory._fast``; known by their ``.pyi`` stubs) and ``plugins/`` under the
name it is installed as, ``knhk_memory.plugins``. Standard library only: it
runs before the package is built.

Each layer lists its modules, then, per lower layer it imports, the modules
it imports there. ``knhk_memory/__init__.py`` (the package's facade, which
re-exports the public API) is in no layer and is shown last.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "knhk_memory"
# plugins/ is installed as knhk_memory.plugins (pyproject.toml, package-dir);
# the import-linter contract names the folder, as import-linter sees it.
PLUGINS_DIR, PLUGINS_NAME = "plugins", f"{PACKAGE}.plugins"
DOC = ROOT / "docs" / "architecture.md"
DOC_BLOCK = re.compile(r"(<!-- layers: begin.*?-->\n```text\n)(.*?)(```\n<!-- layers: end -->)", re.S)


@dataclass
class Layer:
    members: list[str]  # full module names, top-level members of the layer
    independent: bool  # `|` in the contract: members may not import each other
    compiled: set[str] = field(default_factory=set)


@dataclass
class Graph:
    layers: list[Layer]
    modules: dict[str, Path]  # every module: .py files, and compiled modules by their .pyi
    edges: set[tuple[str, str]]  # (importer, imported), both in `modules`
    facade_names: dict[str, set[str]]  # module -> names it takes from the facade that are not submodules


def _module_name(tail: str) -> str:
    return PLUGINS_NAME if tail == PLUGINS_DIR else tail


def load_layers(pyproject: Path = ROOT / "pyproject.toml") -> list[Layer]:
    """The first import-linter contract's layers, top to bottom."""
    config = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    layers = []
    for raw in contract["layers"]:
        sep = "|" if "|" in raw else ":"
        names = [n.strip() for n in raw.split(sep)]
        layer = Layer([], independent=sep == "|")
        for n in names:
            name = _module_name(n.strip("()"))
            layer.members.append(name)
            if n.startswith("("):
                layer.compiled.add(name)
        layers.append(layer)
    return layers


def find_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> source file, for the package, plugins/ and the compiled modules' stubs."""
    out: dict[str, Path] = {}
    for base, name in ((root / PACKAGE, PACKAGE), (root / PLUGINS_DIR, PLUGINS_NAME)):
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = [name, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
        for stub in sorted(base.glob("*.pyi")):
            mod = f"{name}.{stub.stem}"
            if mod not in out:
                out[mod] = stub  # a compiled module (cffi or CPython extension)
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The package modules ``name`` imports, and the facade names it takes."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    facade: set[str] = set()

    def known(mod: str) -> str | None:
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        return mod or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE and (hit := known(alias.name)):
                    targets.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    targets.add(sub)
                elif (hit := known(base)) is not None:
                    targets.add(hit)
                    if hit == PACKAGE:
                        facade.add(alias.name)
    targets.discard(name)
    return targets, facade


def build(root: Path = ROOT) -> Graph:
    modules = find_modules(root)
    edges: set[tuple[str, str]] = set()
    facade_names: dict[str, set[str]] = {}
    for name, path in modules.items():
        if path.suffix == ".pyi":
            continue  # compiled: its imports are C (checked by tests/test_layers.py)
        targets, facade = _imports(name, path, modules)
        edges |= {(name, t) for t in targets}
        if facade and name != PACKAGE:
            facade_names[name] = facade
    return Graph(load_layers(root / "pyproject.toml"), modules, edges, facade_names)


def layer_index(graph: Graph, module: str) -> int | None:
    """The layer (0 = top) that holds ``module``, or None (the facade, or a module in no layer)."""
    for i, layer in enumerate(graph.layers):
        for m in layer.members:
            if module == m or module.startswith(m + "."):
                return i
    return None


def member_of(graph: Graph, module: str) -> str | None:
    i = layer_index(graph, module)
    if i is None:
        return None
    return next(m for m in graph.layers[i].members if module == m or module.startswith(m + "."))


def problems(graph: Graph) -> list[str]:
    """Upward imports, imports between independent siblings, modules in no
    layer, and facade names taken below the CLI: each breaks the layering."""
    out = []
    for mod in sorted(graph.modules):
        if mod != PACKAGE and layer_index(graph, mod) is None:
            out.append(f"{mod} is in no layer: add it to the layers contract in pyproject.toml")
    for src, dst in sorted(graph.edges):
        i, j = layer_index(graph, src), layer_index(graph, dst)
        if i is None or j is None:
            continue
        if j < i:
            out.append(f"{src} imports {dst}: layer {i + 1} may not import layer {j + 1} above it")
        elif i == j and graph.layers[i].independent and member_of(graph, src) != member_of(graph, dst):
            out.append(f"{src} imports {dst}: independent members of layer {i + 1}")
    cli = layer_index(graph, f"{PACKAGE}.cli")
    for mod, names in sorted(graph.facade_names.items()):
        i = layer_index(graph, mod)
        if i is not None and cli is not None and i > cli:
            out.append(f"{mod} takes {', '.join(sorted(names))} from the {PACKAGE} facade, which imports every "
                       f"layer: import it from the module that defines it")
    return out


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".") if module != PACKAGE else PACKAGE


def render(graph: Graph) -> str:
    """The text picture: each layer, its modules, and what it imports below it."""
    lines = [f"{PACKAGE}: {len(graph.layers)} layers, top to bottom (python3 scripts/layers.py)", ""]
    for i, layer in enumerate(graph.layers):
        sep = " | " if layer.independent else " : "
        label = sep.join(_short(m) + (" (compiled)" if m in layer.compiled else "") for m in layer.members)
        lines.append(f"{i + 1:>2}  {label}")
        subs = sorted(_short(m) for m in graph.modules
                      if any(m.startswith(top + ".") for top in layer.members))
        if subs:
            lines.append(f"      modules: {' '.join(subs)}")
        _edges_below(graph, lines, {m for m in graph.modules if layer_index(graph, m) == i})
    lines.append("")
    lines.append(f"    {PACKAGE} (__init__.py, the facade: the public API, re-exported; in no layer)")
    _edges_below(graph, lines, {PACKAGE})
    found = problems(graph)
    lines.append("")
    lines.append("upward imports and modules in no layer: " + ("none" if not found else str(len(found))))
    lines.extend(f"  ! {p}" for p in found)
    return "\n".join(lines) + "\n"


def _edges_below(graph: Graph, lines: list[str], sources: set[str]) -> None:
    by_layer: dict[int, set[str]] = {}
    for src, dst in graph.edges:
        if src in sources and dst not in sources and (j := layer_index(graph, dst)) is not None:
            by_layer.setdefault(j, set()).add(_short(dst))
    facade = sorted({n for src in sources for n in graph.facade_names.get(src, ())})
    if not by_layer and not facade:
        lines.append("      imports nothing in the package")
    for j in sorted(by_layer):
        lines.append(f"      -> {j + 1:>2}: {' '.join(sorted(by_layer[j]))}")
    if facade:
        lines.append(f"      -> the facade: {' '.join(facade)}")


def doc_block(text: str) -> str | None:
    """The picture as docs/architecture.md holds it (between the layers: markers)."""
    m = DOC_BLOCK.search(text)
    return m.group(2) if m else None


def main(argv: list[str]) -> int:
    graph = build()
    picture = render(graph)
    if "--update-doc" in argv:
        text = DOC.read_text()
        if doc_block(text) is None:
            sys.stderr.write(f"{DOC}: no <!-- layers: begin --> ... <!-- layers: end --> block\n")
            return 1
        DOC.write_text(DOC_BLOCK.sub(lambda m: m.group(1) + picture + m.group(3), text, count=1))
    sys.stdout.write(picture)
    return 1 if "--check" in argv and problems(graph) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
