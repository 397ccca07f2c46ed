"""Build script for the C core: joins native/knhk.h (the cdef) and native/*.c.

cffi out-of-line API mode. The module is ``knhk_memory._native``.

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

import numpy
from cffi import FFI

NATIVE = Path(__file__).resolve().parent
HEADER = NATIVE / "knhk.h"


def cdef_text(header: str) -> str:
    """The cdef: the marked region of the header plus every KNHK_ macro.

    Macros are exported as ``#define NAME ...`` so the C compiler, not this
    script, supplies each value (some depend on the target architecture).
    """
    match = re.search(r"/\* KNHK_CDEF_BEGIN \*/(.*?)/\* KNHK_CDEF_END \*/", header, re.S)
    if match is None:
        raise SystemExit(f"{HEADER}: KNHK_CDEF_BEGIN/END markers not found")
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
    args = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"]
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


# numpy's C headers need the full C API, which cffi's default Py_LIMITED_API
# would hide. (Module-level, like compile_args(), so scripts/cross_check.sh
# compiles with exactly these.)
DEFINE_MACROS = [("_CFFI_NO_LIMITED_API", None), ("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
                 ("NPY_TARGET_VERSION", "NPY_2_0_API_VERSION")]
INCLUDE_DIRS = [str(NATIVE), numpy.get_include()]

ffibuilder = FFI()
ffibuilder.cdef(cdef_text(HEADER.read_text()))
ffibuilder.set_source(
    "knhk_memory._native",
    '#include "knhk.h"\n',
    sources=[str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)
             for p in sorted(NATIVE.glob("*.c"))],
    include_dirs=INCLUDE_DIRS,
    define_macros=DEFINE_MACROS,
    py_limited_api=False,
    libraries=["dl", "pthread", "m"],
    extra_compile_args=compile_args(),
    extra_link_args=link_args(),
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(NATIVE.parent / "build" / "cffi"), verbose=True)
