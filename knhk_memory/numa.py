"""NUMA: which memory nodes this machine has, and placing pool and arena memory on them.

Node discovery reads sysfs (``/sys/devices/system/node``: ``online``, and per
node ``cpulist`` and ``meminfo``), the files ``numactl --hardware`` reads;
every function takes ``root`` so a test can hand it a fake tree. Placement
goes through the C core's raw ``mbind(2)`` / ``set_mempolicy(2)`` calls (no
libnuma). A :class:`Placement` is what pools and arenas take:

- ``"local"``: pages on the node of the CPU that first touches them (``MPOL_LOCAL``);
- ``"interleave"``: pages round-robin over every online node with memory (``MPOL_INTERLEAVE``);
- an int ``N``: pages on node N only (``MPOL_BIND``).

On a machine with one node (or a kernel without NUMA, where sysfs has no node
directory and node 0 holds everything) the same calls run and place
everything on node 0. What this module is not: a scheduler; it does not pin
threads to CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._core import ffi, lib
from .errors import NumaError

__all__ = ["NumaNode", "Placement", "nodes", "online_nodes", "parse_cpulist", "resolve", "placement_spec",
           "check_placement",
           "set_thread_policy", "thread_policy", "node_of", "MODES", "SYSFS_ROOT"]

SYSFS_ROOT = "/sys"
NODE_DIR = "devices/system/node"
MAX_NODES = int(lib.KNHK_NUMA_MAX_NODES)
MODES = {"default": lib.KNHK_NUMA_DEFAULT, "preferred": lib.KNHK_NUMA_PREFERRED, "bind": lib.KNHK_NUMA_BIND,
         "interleave": lib.KNHK_NUMA_INTERLEAVE, "local": lib.KNHK_NUMA_LOCAL}
_MODE_NAMES = {v: k for k, v in MODES.items()}


@dataclass(frozen=True)
class NumaNode:
    """One memory node: its number, CPUs, and total memory in bytes (None when sysfs does not say)."""

    id: int
    cpus: tuple[int, ...]
    memory_bytes: int | None


def parse_cpulist(text: str, what: str = "cpulist") -> list[int]:
    """Parse the kernel's list format (``"0-3,8,10-11"``, see Documentation/admin-guide/cputopology.rst).

    Raises :class:`NumaError` naming ``what`` for anything else."""
    out: list[int] = []
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise NumaError(f"{what}: {text!r} is not a kernel list (like '0-3,8'): bad part {part!r}") from None
        if a < 0 or b < a or b - a > 1 << 20:
            raise NumaError(f"{what}: {text!r} is not a kernel list (like '0-3,8'): bad range {part!r}")
        out.extend(range(a, b + 1))
    return out


def _node_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / NODE_DIR


def online_nodes(root: str | os.PathLike[str] = SYSFS_ROOT) -> list[int]:
    """The online node numbers; ``[0]`` on a kernel without NUMA (no sysfs node directory)."""
    d = _node_dir(root)
    online = d / "online"
    if not online.exists():
        return [0]
    try:
        text = online.read_text()
    except OSError as exc:
        raise NumaError(f"{online}: cannot read the online node list ({exc.strerror})") from None
    ids = parse_cpulist(text, str(online))
    bad = [i for i in ids if i >= MAX_NODES]
    if bad:
        raise NumaError(f"{online}: node {bad[0]} is beyond the {MAX_NODES}-node limit")
    return ids or [0]


def _meminfo_total(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            # "Node 0 MemTotal:       16318220 kB"
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "MemTotal:":
                return int(parts[3]) * (1024 if len(parts) < 5 or parts[4] == "kB" else 1)
    except (OSError, ValueError):
        return None
    return None


def nodes(root: str | os.PathLike[str] = SYSFS_ROOT) -> list[NumaNode]:
    """Every online node with its CPUs and memory, read from ``root``'s sysfs tree."""
    d = _node_dir(root)
    out = []
    for i in online_nodes(root):
        nd = d / f"node{i}"
        if not nd.is_dir():
            if i == 0 and not d.exists():  # no NUMA in this kernel: one node with every CPU
                out.append(NumaNode(0, tuple(sorted(os.sched_getaffinity(0))), None))
                continue
            raise NumaError(f"{d}/online lists node {i}, but {nd} does not exist")
        cpus: list[int] = []
        cl = nd / "cpulist"
        if cl.exists():
            try:
                text = cl.read_text()
            except OSError as exc:
                raise NumaError(f"{cl}: cannot read ({exc.strerror})") from None
            cpus = parse_cpulist(text, str(cl))
        out.append(NumaNode(i, tuple(cpus), _meminfo_total(nd / "meminfo")))
    return out


@dataclass(frozen=True)
class Placement:
    """A NUMA policy for a region: ``mode`` is ``"local"``, ``"interleave"`` or ``"bind"``, ``nodes`` the
    node numbers it names (empty for local). ``describe()`` gives the config form back."""

    mode: str
    nodes: tuple[int, ...] = ()

    def describe(self) -> str | int:
        if self.mode == "bind" and len(self.nodes) == 1:
            return self.nodes[0]
        return self.mode

    def mask_words(self) -> list[int]:
        if not self.nodes:
            return []
        words = [0] * (max(self.nodes) // 64 + 1)
        for n in self.nodes:
            words[n // 64] |= 1 << (n % 64)
        return words


def resolve(numa: Any = None, node: Any = None, *, root: str | os.PathLike[str] = SYSFS_ROOT,
            what: str = "numa") -> Placement | None:
    """Turn ``numa=`` (``"local"``, ``"interleave"``, a node number, or None) or ``node=`` (a node
    number, or None) into a :class:`Placement` checked against the machine's nodes; None when both
    are None (the kernel's default policy). Raises :class:`NumaError` (a node that is not online)
    or :class:`TypeError`/:class:`ValueError` naming ``what``, the value and what is accepted."""
    if numa is not None and node is not None:
        raise ValueError(f"give {what}= or node=, not both (got {numa!r} and {node!r})")
    if node is not None:
        numa, what = node, "node"
    if numa is None:
        return None
    if isinstance(numa, str):
        if numa == "local":
            return Placement("local")
        if numa == "interleave":
            return Placement("interleave", tuple(online_nodes(root)))
        raise ValueError(f"{what} must be 'local', 'interleave' or a node number, got {numa!r}")
    if isinstance(numa, bool) or not isinstance(numa, int):
        raise TypeError(f"{what} must be 'local', 'interleave' or a node number (int), got "
                        f"{type(numa).__name__} {numa!r}")
    online = online_nodes(root)
    if numa not in online:
        raise NumaError(f"{what}={numa}: no such node online; online nodes: "
                        f"{', '.join(map(str, online))}")
    return Placement("bind", (numa,))


def placement_spec(p: Placement | None) -> tuple[Any, Any]:
    """``(knhk_numa_spec *, keepalive)`` for the C core (NULL for no placement)."""
    if p is None:
        return ffi.NULL, None
    words = p.mask_words()
    mask = ffi.new("uint64_t[]", words) if words else ffi.NULL
    spec = ffi.new("knhk_numa_spec *", {"mode": MODES[p.mode], "mask": mask, "mask_words": len(words)})
    return spec, (spec, mask)


def _check(status: int, what: str) -> None:
    if status != lib.KNHK_OK:
        msg = ffi.string(lib.knhk_last_error()).decode("utf-8", "replace")
        raise NumaError(f"{what}: {msg}")


def check_placement(placement: Placement) -> None:
    """Ask the kernel to apply ``placement`` to a scratch page: raises :class:`NumaError` (with the
    kernel's reason: no NUMA support, a seccomp filter, a node not online) when it refuses."""
    import mmap

    page = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        buf = ffi.from_buffer(page)
        spec, keep = placement_spec(placement)
        try:
            _check(lib.knhk_numa_mbind(buf, mmap.PAGESIZE, spec.mode, spec.mask, spec.mask_words),
                   f"NUMA placement {placement.describe()!r}")
        finally:
            del buf, keep
    finally:
        page.close()


def set_thread_policy(placement: Placement | None) -> None:
    """Apply ``placement`` to the calling thread's future allocations (None: the default policy)."""
    spec, keep = placement_spec(placement)
    if placement is None:
        _check(lib.knhk_numa_set_thread_policy(lib.KNHK_NUMA_DEFAULT, ffi.NULL, 0), "set_mempolicy")
        return
    _check(lib.knhk_numa_set_thread_policy(spec.mode, spec.mask, spec.mask_words), "set_mempolicy")
    del keep


def thread_policy() -> str:
    """The calling thread's policy mode: ``"default"``, ``"local"``, ``"interleave"``, ``"bind"``, ..."""
    out = ffi.new("int *")
    _check(lib.knhk_numa_thread_policy(out), "get_mempolicy")
    return _MODE_NAMES.get(out[0], f"mode {out[0]}")


def node_of(address: int) -> int:
    """The node the page at ``address`` is on (touch it first; -1 while it has no page)."""
    out = ffi.new("int *")
    _check(lib.knhk_numa_node_of(ffi.cast("void *", address), out), "get_mempolicy")
    return int(out[0])
