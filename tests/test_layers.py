"""The layers hold: no Python module imports a layer above its own, and the C
core has no Python in it (docs/architecture.md).

The Python side is checked twice: by import-linter's contract (pyproject.toml,
`lint-imports`, also run by scripts/check.sh) and by scripts/layers.py's own
reading of the imports, which also sees the compiled modules and plugins/ under
its installed name. The C side is checked here, on the sources.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
CPYTHON = NATIVE / "cpython"

_spec = importlib.util.spec_from_file_location("knhk_layers", ROOT / "scripts" / "layers.py")
assert _spec is not None and _spec.loader is not None
layers = importlib.util.module_from_spec(_spec)
sys.modules["knhk_layers"] = layers  # dataclasses look their module up by name
_spec.loader.exec_module(layers)


# ---------------------------------------------------------------- Python


def test_import_linter_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "lint-imports is not installed: it is in the test extra (pip install -e '.[test]')"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 1 kept, 0 broken." in r.stdout


def test_no_upward_import_and_every_module_in_a_layer():
    graph = layers.build()
    assert layers.problems(graph) == []
    # The scan sees what import-linter cannot: the compiled modules and the plugin folder.
    assert {"knhk_memory._native", "knhk_memory._fast", "knhk_memory.plugins.memory"} <= set(graph.modules)
    assert ("knhk_memory._core", "knhk_memory._native") in graph.edges
    assert ("knhk_memory.plugins.memory", "knhk_memory.hookspecs") in graph.edges


def test_only_core_loads_the_cffi_binding_and_only_capabilities_use_the_fast_module():
    graph = layers.build()
    assert {src for src, dst in graph.edges if dst == "knhk_memory._native"} == {"knhk_memory._core"}
    capabilities = layers.layer_index(graph, "knhk_memory.allocator")
    users = {src for src, dst in graph.edges if dst == "knhk_memory._fast"}
    assert users and all(layers.layer_index(graph, u) == capabilities for u in users), users


def test_argparse_only_in_the_cli():
    graph = layers.build()
    users = set()
    for name, path in graph.modules.items():
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if "argparse" in names or (isinstance(node, ast.ImportFrom) and node.module == "argparse"):
                    users.add(name)
    assert users and all(u.startswith("knhk_memory.cli") for u in users), users


def _tree(tmp_path: Path) -> Path:
    """A copy of the Python sources and pyproject.toml to break on purpose."""
    for name in ("knhk_memory", "plugins"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


UPWARD = [
    ("config.py", "from .cli import main",
     "knhk_memory.config imports knhk_memory.cli: layer 6 may not import layer 2 above it"),
    ("store.py", "from knhk_memory.plugins import memory",
     "knhk_memory.store imports knhk_memory.plugins.memory: layer 6 may not import layer 4 above it"),
    ("_core.py", "from .host import get_plugin_manager",
     "knhk_memory._core imports knhk_memory.host: layer 7 may not import layer 5 above it"),
    ("errors.py", "from . import _fast",
     "knhk_memory.errors imports knhk_memory._fast: independent members of layer 8"),
    ("simd.py", "from . import get_plugin_manager",
     "knhk_memory.simd takes get_plugin_manager from the knhk_memory facade, which imports every layer"),
]


@pytest.mark.parametrize("module, line, expected", UPWARD, ids=[m for m, _, _ in UPWARD])
def test_a_lower_layer_importing_a_higher_one_is_reported(tmp_path, module, line, expected):
    root = _tree(tmp_path)
    path = root / "knhk_memory" / module
    path.write_text(path.read_text() + f"\n\ndef _reach_up():\n    {line}\n")
    found = layers.problems(layers.build(root))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_module_in_no_layer_is_reported(tmp_path):
    root = _tree(tmp_path)
    (root / "knhk_memory" / "newcap.py").write_text('"""A new capability nobody placed."""\n')
    assert layers.problems(layers.build(root)) == [
        "knhk_memory.newcap is in no layer: add it to the layers contract in pyproject.toml"]


def test_the_architecture_doc_shows_the_scripts_picture():
    block = layers.doc_block((ROOT / "docs" / "architecture.md").read_text())
    assert block is not None, "docs/architecture.md lacks the layers.py block markers"
    assert block == layers.render(layers.build()), "regenerate it: python3 scripts/layers.py --update-doc"


# ---------------------------------------------------------------- C


def _code(path: Path) -> str:
    """The C source without comments and string or character literals."""
    text = path.read_text()
    pattern = r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\''
    return re.sub(pattern, lambda m: " " if m.group(0)[0] == "/" else '""', text, flags=re.S)


CORE_FILES = sorted(NATIVE.glob("*.c")) + sorted(NATIVE.glob("*.h"))
GLUE_FILES = sorted(CPYTHON.glob("*.c")) + sorted(CPYTHON.glob("*.h"))


def test_the_sources_are_where_the_checks_look():
    assert len(CORE_FILES) >= 10 and (NATIVE / "knhk.h") in CORE_FILES
    assert (CPYTHON / "fast.c") in GLUE_FILES


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_the_c_core_has_no_python_and_no_numpy(path):
    code = _code(path)
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.M)
    assert not [i for i in includes if i.startswith(("Python", "numpy/", "py")) or i == "structmember.h"], includes
    assert not re.findall(r"\b_?Py[A-Z_]\w*", code), "CPython API in the C core"
    assert not re.findall(r"\b(?:NPY_\w+|npy_\w+|import_array\w*|PyArray\w*|PyDataMem\w*)", code), "numpy in the core"


# The glue may build its own module (PyModule_Create, PyModule_Add* in fast.c's
# init) and import numpy through numpy's own import_array. It never imports
# or writes into another Python module.
GLUE_FORBIDDEN = re.compile(r"\b(PyImport_\w+|PyObject_SetAttr\w*|PyObject_GenericSetAttr|PyModule_GetDict|"
                            r"PySys_GetObject|PySys_SetObject|PyEval_GetBuiltins|PyEval_GetGlobals)\b")


@pytest.mark.parametrize("path", GLUE_FILES, ids=lambda p: p.name)
def test_the_cpython_glue_imports_no_module_and_sets_no_attribute_on_one(path):
    code = _code(path)
    assert GLUE_FORBIDDEN.findall(code) == []
    if path.name != "fast.c":
        assert not re.findall(r"\bPyModule_\w+", code), "only fast.c's init builds the module"


def test_the_c_checks_catch_what_they_are_for(tmp_path):
    core = tmp_path / "bad.c"
    core.write_text('#include <Python.h>\n/* PyObject in a comment is fine */\nint f(void) { return Py_None != 0; }\n')
    with pytest.raises(AssertionError):
        test_the_c_core_has_no_python_and_no_numpy(core)
    glue = tmp_path / "glue.c"
    glue.write_text('static void f(void) { PyObject *m = PyImport_ImportModule("knhk_memory.simd"); '
                    'PyObject_SetAttrString(m, "find", m); }\n')
    with pytest.raises(AssertionError):
        test_the_cpython_glue_imports_no_module_and_sets_no_attribute_on_one(glue)
    ok = tmp_path / "ok.c"
    ok.write_text('/* PyImport_ImportModule("x") in a comment */\nstatic const char *s = "PyObject_SetAttr";\n')
    test_the_cpython_glue_imports_no_module_and_sets_no_attribute_on_one(ok)
