"""``knhk-memory info``: versions, backends, numpy routing, CPU features, config source."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["collect_info", "add_info_command"]


def collect_info(config_path: str | None) -> dict[str, Any]:
    """Everything ``knhk-memory info`` reports, as a JSON-ready dict."""
    import numpy
    from numpy._core.multiarray import get_handler_name

    from .. import __version__
    from .._core import ffi, lib
    from ..allocator import available_backends
    from ..config import load_config
    from ..host import get_plugin_manager

    config = load_config(config_path)
    pm = get_plugin_manager()
    backends = {}
    for name, b in available_backends().items():
        if isinstance(b, Exception):
            backends[name] = {"available": False, "error": str(b)}
        else:
            backends[name] = {"available": True, "path": b.path, "version": b.version}
    pm.hook.knhk_configure(config=config)
    try:
        backend = pm.hook.knhk_allocator(config=config)
        probe = numpy.empty(16)
        numpy_info = {
            "routed": bool(config.allocator.numpy),
            "current_handler": get_handler_name(),
            "new_array_handler": get_handler_name(probe),
            "numpy_version": numpy.__version__,
        }
        del probe
        stats: dict[str, Any] = {}
        for part in pm.hook.knhk_memory_stats(config=config):
            stats.update(part or {})
    finally:
        pm.hook.knhk_unconfigure(config=config)
    bits = lib.knhk_cpu_features()
    features = [name for name, bit in (("sse4.2", lib.KNHK_CPU_SSE42), ("popcnt", lib.KNHK_CPU_POPCNT),
                                       ("avx2", lib.KNHK_CPU_AVX2), ("bmi2", lib.KNHK_CPU_BMI2),
                                       ("avx512f", lib.KNHK_CPU_AVX512F), ("avx512bw", lib.KNHK_CPU_AVX512BW),
                                       ("avx512vl", lib.KNHK_CPU_AVX512VL), ("neon", lib.KNHK_CPU_NEON),
                                       ("avx512-downclock", lib.KNHK_CPU_AVX512_DOWNCLOCK))
                if bits & bit]
    return {
        "version": __version__,
        "native_version": ffi.string(lib.knhk_version()).decode(),
        "config": {"source": config.source, "origin": config.origin, "values": config.as_dict()},
        "backends": backends,
        "selected_backend": {"name": backend.name, "configured": config.allocator.backend,
                             "path": backend.path, "version": backend.version},
        "numpy": numpy_info,
        "build": {"portable": bool(lib.KNHK_PORTABLE_BUILD)},
        "cpu": {"features": features, "detected": not lib.KNHK_PORTABLE_BUILD, "cache_line": lib.KNHK_CACHE_LINE},
        "simd": _simd_info(),
        "plugins": sorted(name for name, _ in pm.list_name_plugin() if name),
        "stats": stats,
    }


def _simd_info() -> dict[str, Any]:
    from .. import simd
    from ..errors import SimdLevelError

    try:
        active: str | None = simd.level()
        error = None
    except SimdLevelError as exc:
        active, error = None, str(exc)
    auto, why = simd.auto_level()
    return {"level": active, "supported": simd.supported_levels(), "error": error,
            "forced_by": os.environ.get("KNHK_SIMD") or None, "auto": auto, "auto_note": why}


def _print_info(info: dict[str, Any]) -> None:
    out = []
    out.append(f"knhk-memory {info['version']} (C core {info['native_version']})")
    cfg = info["config"]
    out.append(f"config:   {cfg['source']} (found by: {cfg['origin']})")
    out.append("backends:")
    for name, b in info["backends"].items():
        if b["available"]:
            out.append(f"  {name:<9} {b['version']:<24} {b['path']}")
        else:
            out.append(f"  {name:<9} unavailable: {b['error']}")
    sel = info["selected_backend"]
    out.append(f"selected: {sel['name']} (configured: {sel['configured']})")
    np_ = info["numpy"]
    out.append(f"numpy:    {'routed through ' + sel['name'] if np_['routed'] else 'not routed'}; "
               f"new arrays use handler {np_['new_array_handler']} (numpy {np_['numpy_version']})")
    if info["build"]["portable"]:
        out.append("build:    portable C only (KNHK_PORTABLE=1): scalar SIMD, clock_gettime ticks, "
                   "no CPU feature detection")
    cpu = info["cpu"]
    features = (' '.join(cpu['features']) or 'no SIMD features') if cpu['detected'] else 'features not detected'
    out.append(f"cpu:      {features}; cache line {cpu['cache_line']} B")
    sd = info["simd"]
    how = f"forced by KNHK_SIMD={sd['forced_by']}" if sd["forced_by"] else "auto"
    out.append(f"simd:     {sd['level'] or 'ERROR: ' + str(sd['error'])} ({how}; "
               f"supported: {', '.join(sd['supported'])})")
    if sd["auto_note"]:
        out.append(f"          auto is {sd['auto']}: {sd['auto_note']}")
    proc = info["stats"].get("allocator", {}).get("process")
    if proc:
        serves = proc["malloc_backend"] or "not a knhk backend"
        out.append(f"process:  malloc from {proc['malloc_library']} ({serves}); "
                   f"CPython objects: {proc['python_allocator']}; RSS {proc['rss_bytes'] or 0:,} B "
                   f"(peak {proc['peak_rss_bytes'] or 0:,} B)")
    out.append(f"plugins:  {', '.join(info['plugins'])}")
    print("\n".join(out))


def _memory_of(pid: int, as_json: bool) -> int:
    from ..launcher import inspect_process

    try:
        info = inspect_process(pid)
    except ValueError as exc:
        print(f"knhk-memory info: error: --memory: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    mib = lambda v: "?" if v is None else f"{v / 2**20:.1f} MiB"  # noqa: E731
    launched = (f"started by knhk-memory run with {info['launched_backend']}" if info["launched_backend"]
                else "not started by knhk-memory run")
    print(f"pid {info['pid']} ({info['name']}): RSS {mib(info['rss_bytes'])}, peak {mib(info['peak_rss_bytes'])}\n"
          f"allocator libraries mapped: {', '.join(info['allocator_libraries']) or 'none (glibc malloc)'}\n"
          f"{launched}; PYTHONMALLOC at start: {info['initial_pythonmalloc'] or 'unset (pymalloc)'}\n"
          "(the allocator's own figures: the knhk_memory_stats hook inside the process)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    if args.memory is not None:
        return _memory_of(args.memory, args.json)
    info = collect_info(args.config)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _print_info(info)
    return 0


def add_info_command(sub: Any, common: argparse.ArgumentParser) -> None:
    info = sub.add_parser("info", parents=[common],
                          help="versions, backends, numpy handler, CPU features, config source")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--memory", metavar="PID", type=int, default=None,
                      help="another process's RSS, peak RSS, allocator libraries and how it was started")
    info.set_defaults(func=_cmd_info)
