"""The one owner of process-wide state: the selected allocator backend, numpy's
routing (the data handler and the routing flag) and the SIMD level.

A configured engine does not set these itself: it :func:`claim`\\ s the settings
it needs and releases the claim when it shuts down. The rule for several
engines in one process:

- the first claim saves what is in force (selected backend, numpy handler of
  the calling thread's context, numpy routing flag, SIMD level), then applies
  its settings;
- a later claim whose settings are the same shares them (a reference count);
- a later claim that asks for different settings is refused with a
  :class:`~knhk_memory.errors.ProcessStateError` naming each setting that
  differs, the value asked for, the value held and who holds it; nothing is
  changed;
- the last release puts back exactly what the first claim saved.

``simd_level="auto"`` asks for no particular level: it accepts the level in
force (the start-up choice, or the level another engine holds), so it never
conflicts. An explicit level must equal the level in force while other engines
hold the process.

numpy keeps its handler in a context variable, so the handler is installed in
the context of the thread that makes the first claim and must be released from
that context too (an engine is configured and unconfigured by one thread).

Shared counter blocks are not process state here: each engine owns the blocks
it creates (:class:`~knhk_memory.counters.Counters`), and a second block under
a name already in use is refused by the operating system's exclusive create.

This module is a capability: it imports the allocator and the SIMD module,
never the plugin, the CLI or a host.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, cast

from . import allocator, simd
from .allocator import Backend
from .errors import KnhkMemoryError, ProcessStateError, SimdLevelError
from .simd import SimdSetting

__all__ = ["Claim", "ProcessSettings", "claim", "holders", "in_force"]


@dataclass(frozen=True)
class ProcessSettings:
    """The process-wide settings one engine needs.

    ``backend`` becomes the selected backend; ``numpy`` routes numpy's array
    data through it (NEP 49 handler in the claiming thread's context, and the
    routing flag :func:`knhk_memory.allocator.apply_numpy_handler` reads);
    ``simd_level`` is ``"auto"`` (keep the level in force) or a level name.
    """

    backend: Backend
    numpy: bool = False
    simd_level: SimdSetting = "auto"


@dataclass
class _Saved:
    """What was in force before the first claim, put back by the last release."""

    selected: Backend
    routing: bool
    numpy_token: Any = None        # the handler token, when numpy was routed
    simd_previous: str | None = None  # the level replaced, when a level was set


@dataclass
class _Held:
    backend: str
    numpy: bool
    simd_level: str | None  # the level in force while held (None: KNHK_SIMD was invalid)
    saved: _Saved
    claims: list[Claim] = field(default_factory=list)


_lock = threading.RLock()
_held: _Held | None = None


class Claim:
    """One engine's hold on the process settings; :meth:`release` gives it back."""

    __slots__ = ("_released", "holder", "settings")

    def __init__(self, settings: ProcessSettings, holder: str) -> None:
        self.settings = settings
        self.holder = holder
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the claim back; the last one restores what was in force before
        the first. A second call does nothing."""
        global _held
        with _lock:
            if self._released:
                return
            self._released = True
            held = _held
            if held is None or self not in held.claims:  # pragma: no cover - cannot happen through claim()
                return
            held.claims.remove(self)
            if held.claims:
                return
            _held = None
            _restore(held.saved)

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return (f"<Claim by {self.holder}: {self.settings.backend.name}, numpy={self.settings.numpy}, "
                f"simd={self.settings.simd_level}, {state}>")


def _current_level() -> str | None:
    try:
        return simd.level()
    except SimdLevelError:  # KNHK_SIMD named a level this machine lacks: no level is in force
        return None


def _differences(held: _Held, settings: ProcessSettings) -> list[tuple[str, str]]:
    """``[(config key, "asked X, held Y")]`` for every setting that differs."""
    out = []
    if settings.backend.name != held.backend:
        out.append(("allocator.backend", f"allocator backend {settings.backend.name!r} asked, {held.backend!r} held"))
    if settings.numpy != held.numpy:
        asked, had = str(settings.numpy).lower(), str(held.numpy).lower()
        out.append(("allocator.numpy", f"numpy routing {asked} asked, {had} held"))
    if settings.simd_level != "auto" and settings.simd_level != held.simd_level:
        out.append(("simd.level", f"SIMD level {settings.simd_level!r} asked, {held.simd_level!r} held"))
    return out


def claim(settings: ProcessSettings, holder: str) -> Claim:
    """Apply ``settings`` process-wide (or share them with the engines holding
    the same) on behalf of ``holder`` (a description for error messages, such
    as ``"the engine configured from knhk.toml"``).

    :raises ProcessStateError: another engine holds different settings; its
        ``key`` is the config key of the first setting that differs.
    :raises SimdLevelError: the level cannot be set here (nothing is changed).
    :raises NativeError: numpy's handler cannot be installed (nothing is changed).
    """
    global _held
    with _lock:
        held = _held
        if held is not None:
            diffs = _differences(held, settings)
            if diffs:
                raise ProcessStateError(
                    f"{'; '.join(text for _, text in diffs)}: this process's allocator, numpy routing and SIMD "
                    f"level are held by {held.claims[0].holder}"
                    + (f" and {len(held.claims) - 1} more" if len(held.claims) > 1 else "")
                    + "; engines in one process must ask for the same settings (or `auto` for the SIMD level), "
                    "or configure after the holder's knhk_unconfigure", key=diffs[0][0])
            c = Claim(settings, holder)
            held.claims.append(c)
            return c
        saved = _Saved(selected=allocator.selected_backend(), routing=allocator.numpy_routing_enabled())
        try:
            if settings.simd_level != "auto":
                saved.simd_previous = simd.set_level(settings.simd_level)
            if settings.numpy:
                saved.numpy_token = allocator.install_numpy_handler(settings.backend)
            allocator.set_numpy_routing(settings.numpy)
            allocator.select_backend(settings.backend)
        except BaseException:
            _restore(saved)
            raise
        c = Claim(settings, holder)
        _held = _Held(settings.backend.name, settings.numpy, _current_level(), saved, [c])
        return c


def _restore(saved: _Saved) -> None:
    """Put back everything ``saved`` recorded; every part is tried, the first error raised."""
    errors: list[KnhkMemoryError] = []
    token, saved.numpy_token = saved.numpy_token, None
    if token is not None:
        try:
            token.restore()
        except KnhkMemoryError as exc:  # restoring from another thread's context; the rest still goes back
            errors.append(exc)
    allocator.set_numpy_routing(saved.routing)
    allocator.select_backend(saved.selected)
    previous, saved.simd_previous = saved.simd_previous, None
    # "none": the process started with an invalid KNHK_SIMD, which cannot be
    # put back; the level the claim set stays.
    if previous is not None and previous in simd.LEVELS:
        simd.set_level(cast(SimdSetting, previous))
    if errors:
        raise errors[0]


def holders() -> list[str]:
    """Who holds the process settings now (empty when nobody does), first claim first."""
    with _lock:
        return [c.holder for c in _held.claims] if _held is not None else []


def in_force() -> dict[str, Any]:
    """The process-wide settings now in force and who holds them (JSON-serialisable)."""
    with _lock:
        return {"backend": allocator.selected_backend().name, "numpy_routing": allocator.numpy_routing_enabled(),
                "simd_level": _current_level(), "holders": holders()}
