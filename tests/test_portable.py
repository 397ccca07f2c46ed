"""The portable build (KNHK_PORTABLE=1): the C core as a machine without x86
or aarch64 code gets it, built and tested on this one.

Three checks:

- every architecture test in native/ honours KNHK_PORTABLE (a source scan);
- preprocessed with KNHK_PORTABLE, the core has no intrinsics, no
  instruction-emitting asm, no cpuid and no architecture builtins;
- a copy of the package built with KNHK_PORTABLE=1 in a temporary directory
  passes the SIMD tests with ``scalar`` as its only level (marker
  ``portable_build``: about 20 s; deselect with ``-m "not portable_build"``).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy
import pytest

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
SIMD_TESTS = sorted(p.name for p in (ROOT / "tests").glob("test_simd*.py"))

# Predefined macros that name an architecture or its instruction sets.
ARCH_MACRO = re.compile(r"\b__(?:x86_64__|i386__|amd64__|aarch64__|arm__|ARM_NEON\w*|ARM_ARCH\w*|SSE\w*|AVX\w*"
                        r"|riscv\w*|powerpc\w*|PPC\w*|s390\w*|mips\w*)")
CONDITIONAL = re.compile(r"^\s*#\s*(?:if|elif|ifdef|ifndef)\b")


def conditionals(text: str) -> list[tuple[int, str]]:
    """``(line number, directive)`` for every #if/#elif/#ifdef/#ifndef, continuations joined."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        start, line = i + 1, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i]
        if CONDITIONAL.match(line):
            out.append((start, re.sub(r"/\*.*?\*/|//.*$", "", line)))
        i += 1
    return out


def test_every_architecture_branch_honours_knhk_portable():
    sources = sorted(NATIVE.glob("*.c")) + sorted(NATIVE.glob("*.h"))
    assert len(sources) > 10
    offenders, seen = [], 0
    for path in sources:
        for lineno, directive in conditionals(path.read_text()):
            if ARCH_MACRO.search(directive):
                seen += 1
                if "!defined(KNHK_PORTABLE)" not in directive.replace(" ", ""):
                    offenders.append(f"native/{path.name}:{lineno}: {directive.strip()}")
    assert seen >= 8  # the scan found the guards it is meant to check
    assert not offenders, ("these architecture tests ignore KNHK_PORTABLE; add `&& !defined(KNHK_PORTABLE)` "
                           "so a portable build takes the fallback:\n" + "\n".join(offenders))


# Headers and constructs a portable build must not reach, and what each is.
FORBIDDEN_HEADERS = re.compile(r"(?:^|/)(?:\w*intrin\.h|cpuid\.h|arm_neon\.h|arm_acle\.h|arm_sve\.h)$")
FORBIDDEN_CODE = {
    "instruction-emitting asm": re.compile(r"\b(?:__asm__|asm)\s*(?:__volatile__|volatile)?\s*\(\s*\"(?!\")"),
    "CPU feature builtin": re.compile(r"\b__builtin_cpu_\w+"),
    "architecture builtin": re.compile(r"\b__builtin_(?:ia32|aarch64|arm|neon|thread_pointer)\w*"),
    "target attribute": re.compile(r"\btarget\s*\(\s*\""),
    "intrinsic": re.compile(r"\b(?:_mm\d*_\w+|__rdtscp?|__cpuid\w*|__get_cpuid\w*)\s*\("),
}
LINEMARKER = re.compile(r'^# \d+ "([^"]+)"')


def preprocess(source: Path, *defines: str) -> str:
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    # The build defines the version (native/build_native.py); core.c refuses to compile without it.
    cmd = [*cc, "-E", "-std=gnu11", '-DKNHK_VERSION_STRING="0"', *defines, "-I", str(NATIVE),
           "-I", sysconfig.get_paths()["include"], "-I", numpy.get_include(), str(source)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr}"
    return r.stdout


def architecture_code(preprocessed: str) -> list[str]:
    """What in ``preprocessed`` is architecture-specific: forbidden headers it
    includes, and forbidden constructs in the lines that come from native/."""
    found, current = [], ""
    for line in preprocessed.split("\n"):
        marker = LINEMARKER.match(line)
        if marker:
            current = marker.group(1)
            if FORBIDDEN_HEADERS.search(current):
                found.append(f"includes {current}")
            continue
        if Path(current).parent.name == "native":
            for what, pattern in FORBIDDEN_CODE.items():
                if m := pattern.search(line):
                    found.append(f"{Path(current).name}: {what}: {m.group(0)}")
    return sorted(set(found))


def test_portable_sources_have_no_architecture_code():
    offenders = {}
    for source in sorted(NATIVE.glob("*.c")):
        found = architecture_code(preprocess(source, "-DKNHK_PORTABLE=1"))
        if found:
            offenders[source.name] = found
    assert not offenders, f"with KNHK_PORTABLE the core still has architecture-specific code: {offenders}"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the positive control needs x86_64")
def test_the_architecture_code_check_finds_the_x86_kernels():
    # Without KNHK_PORTABLE the same check sees the AVX kernels and rdtsc: it is not vacuous.
    found = architecture_code(preprocess(NATIVE / "simd.c"))
    assert any("immintrin.h" in f for f in found), found
    assert any("target attribute" in f for f in found), found
    ticks = architecture_code(preprocess(NATIVE / "ticks.c"))  # the one tick source (simd.c times through it)
    assert any("__rdtsc" in f for f in ticks), ticks


# ---------------------------------------------------------------- the build

def copy_project(dest: Path) -> None:
    """What a KNHK_PORTABLE build and the SIMD tests need, laid out as installed
    (knhk_memory.plugins inside the package), without the in-place binary."""
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.o")
    shutil.copytree(ROOT / "knhk_memory", dest / "knhk_memory", ignore=skip)
    shutil.copytree(ROOT / "plugins", dest / "knhk_memory" / "plugins", ignore=skip)
    shutil.copytree(ROOT / "native", dest / "native", ignore=skip)
    (dest / "tests").mkdir()
    for name in ("__init__.py", "conftest.py", *SIMD_TESTS):
        shutil.copy2(ROOT / "tests" / name, dest / "tests" / name)
    shutil.copytree(ROOT / "docs", dest / "docs")  # test_simd reads docs/hooks.md
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)


PROBE = """
import json
from knhk_memory import simd
from knhk_memory._core import ffi, lib
import knhk_memory, knhk_memory.plugins, knhk_memory._native
c = ffi.new("knhk_tick_counter *")
assert lib.knhk_ticks_counter(c) == lib.KNHK_OK
print(json.dumps({
    "files": [knhk_memory.__file__, knhk_memory.plugins.__file__, knhk_memory._native.__file__],
    "portable": simd.PORTABLE_BUILD, "levels": simd.supported_levels(), "level": simd.level(),
    "cpu_features": lib.knhk_cpu_features(), "cache_line": lib.KNHK_CACHE_LINE,
    "tick_source": ffi.string(lib.knhk_ticks_source_name(c.source)).decode(), "has_tsc": c.has_tsc,
}))
"""


@pytest.mark.portable_build
def test_portable_build_passes_the_simd_tests(tmp_path):
    import json

    assert SIMD_TESTS, "no tests/test_simd*.py to run against the portable build"
    copy_project(tmp_path)
    env = {**os.environ, "KNHK_PORTABLE": "1", "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("KNHK_SIMD", None)  # a level forced for the outer run may not exist in this build
    started = time.monotonic()
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"KNHK_PORTABLE=1 build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    built = time.monotonic() - started
    warnings = [line for line in build.stderr.splitlines() if "warning:" in line and "native/" in line]
    assert not warnings, "the portable build warns:\n" + "\n".join(warnings)

    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    facts = json.loads(probe.stdout)
    assert all(Path(f).is_relative_to(tmp_path) for f in facts["files"]), facts["files"]  # the copy, not ROOT
    assert facts["portable"] is True and facts["levels"] == ["scalar"] and facts["level"] == "scalar"
    assert facts["cpu_features"] == 0 and facts["cache_line"] == 64
    assert facts["tick_source"] == "clock_gettime" and facts["has_tsc"] == 0

    info = subprocess.run([sys.executable, "-c", "from knhk_memory.cli import main; raise SystemExit(main(['info']))"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "build:    portable C only (KNHK_PORTABLE=1)" in info.stdout
    assert "simd:     scalar (auto; supported: scalar)" in info.stdout

    tests = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
                            *(f"tests/{name}" for name in SIMD_TESTS)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, f"SIMD tests failed against the portable build:\n{tests.stdout[-6000:]}"
    assert re.search(r"\b\d+ passed\b", tests.stdout) and " failed" not in tests.stdout
    print(f"portable build {built:.1f} s, total {time.monotonic() - started:.1f} s")
