"""Every exported C function is called at least once here: a broken build
fails this file before anything subtler."""

from __future__ import annotations

import re
from pathlib import Path

from knhk_memory._core import ffi, lib

NATIVE = Path(__file__).resolve().parent.parent / "native"
HEADERS = (NATIVE / "knhk.h", NATIVE / "knhk_hotops.h")


def exported_functions() -> set[str]:
    names: set[str] = set()
    for header in HEADERS:
        region = header.read_text().split("/* KNHK_CDEF_BEGIN */")[1].split("/* KNHK_CDEF_END */")[0]
        names.update(re.findall(r"\b(knhk_[a-z0-9_]+)\s*\(", region))
    return names


def test_every_exported_function_is_in_the_module():
    missing = [name for name in exported_functions() if not hasattr(lib, name)]
    assert missing == []


def test_every_exported_function_is_called_by_some_test():
    tests = Path(__file__).resolve().parent
    source = "\n".join(p.read_text() for p in tests.rglob("*.py"))
    package = Path(__file__).resolve().parent.parent / "knhk_memory"
    source += "\n".join(p.read_text() for p in package.rglob("*.py"))
    source += "\n".join(p.read_text() for p in (package.parent / "plugins").rglob("*.py"))
    # Called directly, or handed to the tick harness as a function pointer.
    uncalled = sorted(name for name in exported_functions()
                      if f"lib.{name}(" not in source and f'addressof(lib, "{name}")' not in source)
    assert uncalled == [], "exported C functions no Python code calls"


def test_the_core_is_one_shared_library_with_only_the_public_api():
    """The cffi binding and the fast-path module both load the same core (one
    copy of its state), which exports knhk_ names only."""
    import subprocess

    from knhk_memory import _fast, _native

    maps = Path("/proc/self/maps").read_text()
    cores = {line.split()[-1] for line in maps.splitlines() if "libknhk" in line}
    assert len(cores) == 1, cores
    assert ffi.string(lib.knhk_version()).decode() == _fast.CORE_VERSION
    assert Path(_native.__file__).parent == Path(next(iter(cores))).parent
    nm = subprocess.run(["nm", "-D", "--defined-only", next(iter(cores))], capture_output=True, text=True)
    if nm.returncode == 0:
        names = [line.split()[-1] for line in nm.stdout.splitlines() if line.strip()]
        assert names and all(n.startswith("knhk_") for n in names), [n for n in names if not n.startswith("knhk_")]
        assert set(names) == exported_functions()


def test_fast_path_support_functions():
    assert lib.knhk_simd_ready() == 1
    arena = ffi.new("knhk_arena **")
    assert lib.knhk_arena_create(lib.knhk_backend_get(lib.KNHK_BACKEND_SYSTEM) or _system(), 4096, 4096, 0,
                                 arena) == lib.KNHK_OK
    assert lib.knhk_arena_retain(arena[0]) == lib.KNHK_OK
    lib.knhk_arena_close(arena[0])
    assert lib.knhk_arena_retain(arena[0]) == lib.KNHK_ERR_STATE  # closed: refused
    lib.knhk_arena_release(arena[0])  # the last reference: memory returned


def _system():
    out = ffi.new("knhk_backend **")
    assert lib.knhk_backend_load(lib.KNHK_BACKEND_SYSTEM, ffi.NULL, out, ffi.NULL, 0) == lib.KNHK_OK
    return out[0]


def test_core_functions():
    assert ffi.string(lib.knhk_version()).decode().count(".") == 2
    assert ffi.string(lib.knhk_status_name(lib.KNHK_ERR_INVALID)).decode() == "invalid argument"
    assert ffi.string(lib.knhk_status_name(999)).decode() == "unknown status"
    assert isinstance(ffi.string(lib.knhk_last_error()), bytes)
    assert lib.knhk_cpu_features() == lib.knhk_cpu_features()
    assert lib.KNHK_CACHE_LINE in (64, 128)


def test_backend_get_before_and_after_load():
    assert lib.knhk_backend_get(-1) == ffi.NULL
    assert lib.knhk_backend_get(lib.KNHK_BACKEND_COUNT) == ffi.NULL
    out = ffi.new("knhk_backend **")
    err = ffi.new("char[256]")
    assert lib.knhk_backend_load(lib.KNHK_BACKEND_SYSTEM, ffi.NULL, out, err, 256) == lib.KNHK_OK
    assert lib.knhk_backend_get(lib.KNHK_BACKEND_SYSTEM) == out[0]
    assert lib.knhk_backend_id_of(out[0]) == lib.KNHK_BACKEND_SYSTEM
    assert ffi.string(lib.knhk_backend_name(out[0])) == b"system"
    assert lib.knhk_backend_load(7, ffi.NULL, out, err, 256) == lib.KNHK_ERR_INVALID
    assert b"backend id 7" in ffi.string(err)
