"""``knhk-memory shm list`` / ``knhk-memory shm gc``: the shared-memory blocks in
/dev/shm, and removing the leftovers of killed creators.

A shared counter, pattern or metrics block stays in /dev/shm when its creator is
killed (SIGKILL, a crash). ``shm gc`` removes the ones that are knhk blocks
(checked by header magic), belong to the user running it, whose creator is gone
(pid and start time, so a reused pid is not mistaken for it) and which no
process maps; it prints each block it removes. See
:mod:`knhk_memory.segments` for the rules.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_shm_command"]


def _row(seg: Any) -> str:
    return f"{seg.path}  {seg.kind:<8} {seg.size:>12,} B  {seg.user:<10} {seg.state}"


def _check_dir(args: argparse.Namespace) -> None:
    """--dir must be a directory: a missing one is a user error, never "0 blocks"."""
    import os

    from ..errors import KnhkMemoryError

    if not os.path.isdir(args.dir):
        what = "does not exist" if not os.path.exists(args.dir) else "is not a directory"
        raise KnhkMemoryError(f"--dir {args.dir}: {what}; give the directory shared-memory blocks live in "
                              "(default /dev/shm)")


def _cmd_list(args: argparse.Namespace) -> int:
    from ..segments import list_segments

    _check_dir(args)

    segs = list_segments(args.prefix, args.dir)
    if args.json:
        print(json.dumps([s.as_dict() for s in segs], indent=2))
        return 0
    for s in segs:
        print(_row(s))
    left = sum(s.leftover for s in segs)
    print(f"{len(segs)} knhk block(s) in {args.dir}" + (f" named {args.prefix}*" if args.prefix else "")
          + f"; {left} leftover(s)" + (" (knhk-memory shm gc removes them)" if left else ""))
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from ..segments import list_segments, reclaim

    _check_dir(args)

    removed: list[Any] = []
    kept: list[Any] = []
    for seg in list_segments(args.prefix, args.dir):
        if not seg.leftover:
            kept.append(seg)
        elif args.dry_run or reclaim(seg):
            removed.append(seg)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "removed": [s.as_dict() for s in removed],
                          "kept": [s.as_dict() for s in kept]}, indent=2))
        return 0
    for s in removed:
        print(f"{verb} {s.path} ({s.kind}, {s.size:,} bytes, created by pid {s.creator_pid}, gone)")
    if args.verbose:
        for s in kept:
            print(f"kept {s.path} ({s.kind}): {s.state}")
    print(f"{verb} {len(removed)} leftover block(s); kept {len(kept)} other knhk block(s)")
    return 0


def add_shm_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("shm", parents=[common], help="list knhk's shared-memory blocks, remove leftovers of "
                       "killed processes",
                       description="The knhk blocks (counters, pattern statistics, metrics) in /dev/shm: who made "
                                   "them and whether anything still uses them (list), and removing the ones "
                                   "killed creators left behind (gc). Only knhk blocks (checked by header magic) "
                                   "of the user running the command, whose creator is gone and which no process "
                                   "maps, are ever removed.")
    ssub = p.add_subparsers(dest="shm_command", metavar="ACTION", required=True)
    lp = ssub.add_parser("list", parents=[common], help="list knhk blocks and their state")
    gp = ssub.add_parser("gc", parents=[common], help="remove leftover knhk blocks, printing each one")
    gp.add_argument("-n", "--dry-run", action="store_true", help="print what would be removed, remove nothing")
    gp.add_argument("-v", "--verbose", action="store_true", help="also print the blocks kept, and why")
    for q in (lp, gp):
        q.add_argument("--prefix", default="", metavar="TEXT", help="only blocks whose name starts with TEXT")
        q.add_argument("--dir", default="/dev/shm", metavar="DIR", help="directory to look in (default /dev/shm)")
        q.add_argument("--json", action="store_true", help="machine-readable output")
    lp.set_defaults(func=_cmd_list)
    gp.set_defaults(func=_cmd_gc)
