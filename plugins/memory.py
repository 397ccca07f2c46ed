"""The memory plugin: hands a workflow engine its configured memory services.

Registered in the ``knhk.plugins`` entry-point group under the name
``memory``. State lives in ``config.stash[STASH_KEY]``, one
:class:`MemoryServices` per configured engine; this module keeps none.
"""

from __future__ import annotations

from typing import Any

from knhk_memory.allocator import (
    Backend,
    install_numpy_handler,
    resolve_backend,
    select_backend,
    set_numpy_routing,
)
from knhk_memory import simd
from knhk_memory.config import Config
from knhk_memory.errors import BackendUnavailableError, SimdLevelError
from knhk_memory.hookspecs import hookimpl

STASH_KEY = "knhk_memory.memory"


class MemoryServices:
    """What the plugin set up for one configuration, and how to undo it."""

    def __init__(self, config: Config) -> None:
        # Resolve everything first: nothing is applied if any of it fails.
        name = config.allocator.backend
        try:
            self.backend, self.auto_skipped = resolve_backend(name)
        except BackendUnavailableError as exc:
            raise config.error("allocator.backend", str(exc)) from None
        self.numpy = bool(config.allocator.numpy)
        self._numpy_token: Any = None
        self.simd_level = config.simd.level
        if self.simd_level != "auto" and self.simd_level not in simd.supported_levels():
            raise config.error("simd.level", f"this CPU does not support the {self.simd_level} level; "
                               f"supported: {', '.join(simd.supported_levels())}, or auto")
        self._simd_previous: str | None = None

    def apply(self) -> None:
        select_backend(self.backend)
        if self.numpy:
            self._numpy_token = install_numpy_handler(self.backend)
        set_numpy_routing(self.numpy)
        if self.simd_level != "auto":
            self._simd_previous = simd.set_level(self.simd_level)

    def close(self) -> None:
        previous, self._simd_previous = self._simd_previous, None
        if previous is not None:
            try:
                simd.set_level(previous)
            except SimdLevelError:  # the process started with a bad KNHK_SIMD; leave ours
                pass
        token, self._numpy_token = self._numpy_token, None
        if token is not None:
            token.restore()
        set_numpy_routing(False)

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "numpy": self.numpy,
            "counts": self.backend.stats().as_dict(),
            "native": self.backend.native_stats().as_dict(),
        }


def services(config: Config) -> MemoryServices:
    try:
        return config.stash[STASH_KEY]
    except KeyError:
        raise RuntimeError("the memory plugin is not configured: the engine must call "
                           "pm.hook.knhk_configure(config=config) first") from None


@hookimpl
def knhk_configure(config: Config) -> None:
    svc = MemoryServices(config)
    svc.apply()
    config.stash[STASH_KEY] = svc


@hookimpl
def knhk_unconfigure(config: Config) -> None:
    svc = config.stash.pop(STASH_KEY, None)
    if svc is not None:
        svc.close()


@hookimpl
def knhk_allocator(config: Config) -> Backend:
    return services(config).backend


@hookimpl
def knhk_simd_level(config: Config) -> str:
    services(config)
    return simd.level()


@hookimpl
def knhk_memory_stats(config: Config) -> dict[str, Any]:
    return {"allocator": services(config).stats()}
