"""Build script: the C core, its cffi binding and the CPython fast-path module.

Three binaries, one per layer, each linking only the one below it:

- ``knhk_memory/libknhk*.so``: the C core, native/*.c, a plain shared library
  with no Python in it. It exports what knhk.h and knhk_hotops.h declare and
  nothing else (-fvisibility=hidden, the headers' visibility pragmas), so the
  process has one copy of its state (backends, SIMD level, stripes) whoever
  calls it.
- ``knhk_memory._native``: the cffi binding (out-of-line API mode) of those two
  headers' cdef regions. Python reaches the core through it (``_core.py``).
- ``knhk_memory._fast``: the CPython fast paths, native/cpython/*.c
  (METH_FASTCALL builtins, numpy's NEP 49 handlers), on the public C API only.

Both modules find the core beside them (RUNPATH ``$ORIGIN``); setup.py's
``build_ext`` builds the core first (:func:`core_extension`,
:func:`fast_extension`, :func:`link_to_core`).

Switches are environment variables, read here and nowhere else:

- ``KNHK_SANITIZE=address`` (or ``address,undefined``): build with the
  sanitizers. Run the tests with the runtime preloaded, see docs/development.md.
- ``KNHK_DEBUG=1``: ``-O0 -g`` and internal asserts on.
- ``KNHK_CFLAGS``: extra flags appended verbatim.
- ``KNHK_PORTABLE=1``: defines ``KNHK_PORTABLE``, which every x86_64/aarch64
  branch in native/ honours: the core is built as for an architecture it has
  no special case for (scalar SIMD only, clock_gettime ticks, no CPU feature
  detection), the build a non-x86 machine gets. tests/test_portable.py builds
  it on every test run.

Never ``-march=native``: the wheel must run on any x86_64. SIMD kernels are
enabled per function with target attributes and chosen at run time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from cffi import FFI

NATIVE = Path(__file__).resolve().parent
HEADER = NATIVE / "knhk.h"
HEADERS = (HEADER, NATIVE / "knhk_hotops.h")
CORE_NAME = "knhk_memory.libknhk"
FAST_NAME = "knhk_memory._fast"
CORE_LIBRARIES = ["dl", "pthread", "m"]


def version() -> str:
    """The package version, written once: ``__version__`` in knhk_memory/_version.py
    (pyproject.toml reads the same through ``[tool.setuptools.dynamic]``)."""
    import ast

    tree = ast.parse((NATIVE.parent / "knhk_memory" / "_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise RuntimeError("knhk_memory/_version.py does not assign __version__")


def cdef_text(header: str) -> str:
    """The cdef: the marked region of the header plus every KNHK_ macro.

    Macros are exported as ``#define NAME ...`` so the C compiler, not this
    script, supplies each value (some depend on the target architecture).
    """
    match = re.search(r"/\* KNHK_CDEF_BEGIN \*/(.*?)/\* KNHK_CDEF_END \*/", header, re.S)
    if match is None:
        raise SystemExit("a native/ header lacks its KNHK_CDEF_BEGIN/END markers")
    macros = sorted(set(re.findall(r"^#define (KNHK_[A-Z0-9_]+)[ \t]+\S", header, re.M)))
    return match.group(1) + "".join(f"#define {name} ...\n" for name in macros)


def _accepted(flag: str) -> bool:
    """Whether the C compiler (and its assembler) take ``flag``."""
    import subprocess
    import sysconfig
    import tempfile

    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("int knhk_probe(int x) { return x ? x + 1 : 0; }\n")
        try:
            return subprocess.run([*cc, flag, "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                                  capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


# Skylake to Cascade Lake (the JCC erratum microcode): a jump that crosses or
# ends on a 32-byte boundary is not cached as decoded uops, so a hot loop's
# speed depended on where the linker happened to put it (search_64 moved
# between 11 and 15 ticks from one build to the next). The assembler pads
# such jumps away; other CPUs lose nothing but a few bytes of code.
JCC_FLAG = "-Wa,-mbranches-within-32B-boundaries"


def portable() -> bool:
    """Whether ``KNHK_PORTABLE`` asks for the portable-C-only build."""
    value = os.environ.get("KNHK_PORTABLE", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"KNHK_PORTABLE={value!r}: expected 1 (portable C only) or 0/unset (the normal build)")
    return value == "1"


def compile_args() -> list[str]:
    args = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden",
            f'-DKNHK_VERSION_STRING="{version()}"']
    if portable():
        args.append("-DKNHK_PORTABLE=1")
    if _accepted(JCC_FLAG):
        args.append(JCC_FLAG)
    if os.environ.get("KNHK_DEBUG") == "1":
        args += ["-O0", "-g3", "-DKNHK_DEBUG=1"]
    else:
        args += ["-O3", "-g", "-DNDEBUG"]
    sanitize = os.environ.get("KNHK_SANITIZE", "").strip()
    if sanitize:
        args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    args += os.environ.get("KNHK_CFLAGS", "").split()
    return args


def link_args() -> list[str]:
    sanitize = os.environ.get("KNHK_SANITIZE", "").strip()
    return [f"-fsanitize={sanitize}"] if sanitize else []


def _relative(paths: list[Path]) -> list[str]:
    cwd = Path.cwd()
    return [str(p.relative_to(cwd)) if p.is_relative_to(cwd) else str(p) for p in paths]


CORE_SOURCES = sorted(NATIVE.glob("*.c"))
FAST_SOURCES = sorted((NATIVE / "cpython").glob("*.c"))
# numpy's C headers, for the fast-path module only (the core has no Python).
# (Module-level, like compile_args(), so scripts/cross_check.sh compiles with exactly these.)
FAST_DEFINE_MACROS = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
                      ("NPY_TARGET_VERSION", "NPY_2_0_API_VERSION")]
INCLUDE_DIRS = [str(NATIVE)]


def core_extension() -> Any:
    """The C core as a shared library (built like an extension; never imported)."""
    from setuptools import Extension

    return Extension(CORE_NAME, sources=_relative(CORE_SOURCES), include_dirs=INCLUDE_DIRS,
                     libraries=CORE_LIBRARIES, extra_compile_args=compile_args(), extra_link_args=link_args())


def fast_extension() -> Any:
    """knhk_memory._fast, linked to the core by :func:`link_to_core`."""
    import numpy
    from setuptools import Extension

    return Extension(FAST_NAME, sources=_relative(FAST_SOURCES), include_dirs=[*INCLUDE_DIRS, numpy.get_include()],
                     define_macros=FAST_DEFINE_MACROS, extra_compile_args=compile_args(),
                     extra_link_args=link_args())


def link_to_core(ext: Any, core_file: str) -> None:
    """Make ``ext`` (built into the same directory) load the core beside it."""
    folder, name = os.path.split(core_file)
    ext.library_dirs = [*ext.library_dirs, folder]
    ext.extra_link_args = [*ext.extra_link_args, f"-l:{name}", "-Wl,-rpath,$ORIGIN"]


def core_soname(ext: Any, core_file: str) -> None:
    ext.extra_link_args = [*ext.extra_link_args, f"-Wl,-soname,{os.path.basename(core_file)}"]


ffibuilder = FFI()
ffibuilder.cdef("".join(cdef_text(h.read_text()) for h in HEADERS))
ffibuilder.set_source(
    "knhk_memory._native",
    '#include "knhk.h"\n#include "knhk_hotops.h"\n',
    include_dirs=INCLUDE_DIRS,
    py_limited_api=False,
    extra_compile_args=compile_args(),
    extra_link_args=link_args(),
)
