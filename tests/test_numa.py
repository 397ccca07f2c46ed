"""NUMA: node discovery against fake sysfs trees, placement of pools and arenas on this machine (issue 19)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from knhk_memory import numa
from knhk_memory.arena import Arena, ThreadLocalArena
from knhk_memory.errors import NumaError
from knhk_memory.numa import NumaNode, Placement, nodes, online_nodes, parse_cpulist, resolve
from knhk_memory.pools import FixedPool, LockFreePool, ThreadLocalPool


def fake_sysfs(root: Path, layout: dict[int, tuple[str, int]], online: str | None = None) -> Path:
    """A sysfs tree with nodes {id: (cpulist, MemTotal kB)}."""
    d = root / "devices/system/node"
    d.mkdir(parents=True)
    (d / "online").write_text((online if online is not None else ",".join(map(str, sorted(layout)))) + "\n")
    for i, (cpus, kb) in layout.items():
        nd = d / f"node{i}"
        nd.mkdir()
        (nd / "cpulist").write_text(cpus + "\n")
        (nd / "meminfo").write_text(f"Node {i} MemTotal:       {kb} kB\nNode {i} MemFree:        12 kB\n")
    return root


def test_parse_cpulist() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("") == []
    for bad in ("a", "3-1", "1-", "-1", "0,,2"):
        with pytest.raises(NumaError, match="is not a kernel list \\(like '0-3,8'\\)"):
            parse_cpulist(bad, "x")


def test_four_node_machine(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: ("0-7", 1000), 1: ("8-15", 2000), 2: ("16-23", 3000), 3: ("", 4000)},
                      online="0-3")
    assert online_nodes(root) == [0, 1, 2, 3]
    ns = nodes(root)
    assert ns[1] == NumaNode(1, tuple(range(8, 16)), 2000 * 1024)
    assert ns[3].cpus == () and ns[3].memory_bytes == 4000 * 1024  # a memory-only node
    assert resolve(2, root=root) == Placement("bind", (2,))
    assert resolve(node=3, root=root) == Placement("bind", (3,))
    assert resolve("interleave", root=root) == Placement("interleave", (0, 1, 2, 3))
    assert resolve("local", root=root) == Placement("local")
    assert resolve(None, root=root) is None
    assert Placement("interleave", (0, 1, 2, 3)).mask_words() == [0b1111]
    assert Placement("bind", (70,)).mask_words() == [0, 1 << 6]
    assert Placement("bind", (2,)).describe() == 2 and Placement("interleave", (0, 1)).describe() == "interleave"


def test_sparse_online_nodes_and_missing_node_dir(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {0: ("0-1", 1), 2: ("2-3", 1)}, online="0,2")
    assert [n.id for n in nodes(root)] == [0, 2]
    with pytest.raises(NumaError, match="numa=1: no such node online; online nodes: 0, 2"):
        resolve(1, root=root)
    (root / "devices/system/node/online").write_text("0-2\n")
    with pytest.raises(NumaError, match=r"lists node 1, but .*node1 does not exist"):
        nodes(root)
    (root / "devices/system/node/online").write_text("0-x\n")
    with pytest.raises(NumaError, match="online: '0-x' is not a kernel list"):
        online_nodes(root)
    (root / "devices/system/node/online").write_text("4096\n")
    with pytest.raises(NumaError, match="node 4096 is beyond the 1024-node limit"):
        online_nodes(root)


def test_kernel_without_numa(tmp_path: Path) -> None:
    # No devices/system/node at all: one node, every CPU this process may run on.
    assert online_nodes(tmp_path) == [0]
    (n,) = nodes(tmp_path)
    assert n.id == 0 and set(n.cpus) == os.sched_getaffinity(0) and n.memory_bytes is None


@pytest.mark.parametrize(("args", "exc", "message"), [
    ({"numa": "remote"}, ValueError, "numa must be 'local', 'interleave' or a node number, got 'remote'"),
    ({"numa": True}, TypeError, "numa must be 'local', 'interleave' or a node number (int), got bool True"),
    ({"node": "0"}, ValueError, "node must be 'local', 'interleave' or a node number, got '0'"),
    ({"numa": 0, "node": 0}, ValueError, "give numa= or node=, not both (got 0 and 0)"),
    ({"node": -1}, NumaError, "node=-1: no such node online"),
])
def test_resolve_bad_values(args: dict, exc: type, message: str) -> None:
    with pytest.raises(exc) as info:
        resolve(**args)
    assert message in str(info.value)


def test_this_machine_has_node_zero() -> None:
    assert 0 in online_nodes()
    assert any(n.id == 0 for n in nodes())
    assert numa.thread_policy() in ("default", "local", "interleave", "bind", "preferred")


@pytest.mark.parametrize("cls", [FixedPool, LockFreePool, ThreadLocalPool])
@pytest.mark.parametrize("where", [{"node": 0}, {"numa": 0}, {"numa": "local"}, {"numa": "interleave"}])
def test_pools_placed_on_this_machine(cls: type, where: dict) -> None:
    with cls(4096, 8, align=4096, **where) as p:
        a = p.alloc()
        p.view(a)[0] = 1  # fault the page in under the policy
        st = p.stats()
        assert st.numa == (0 if where in ({"node": 0}, {"numa": 0}) else where["numa"])
        if where.get("numa") != "local":
            assert numa.node_of(a) == 0
        p.free(a)


def test_arena_placed_and_counted() -> None:
    a = Arena(numa=0)
    buf = a.alloc(200_000)
    buf[0] = 1
    assert a.numa_counts() == (1, 0)
    assert a.placement == Placement("bind", (0,))
    a.close()
    t = ThreadLocalArena(numa="interleave")
    t.alloc(10)
    assert t.arena.numa_counts() == (1, 0)
    t.close()
    with pytest.raises(NumaError, match="numa=9: no such node online"):
        Arena(numa=9)


def test_thread_policy_roundtrip() -> None:
    import threading

    seen: list[str] = []

    def run() -> None:  # a fresh thread, so the test process keeps its policy
        numa.set_thread_policy(Placement("interleave", (0,)))
        seen.append(numa.thread_policy())
        numa.set_thread_policy(None)
        seen.append(numa.thread_policy())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == ["interleave", "default"]
