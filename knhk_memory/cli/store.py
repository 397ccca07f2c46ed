"""``knhk-memory store build|get|list|verify|stats``: workflow store files from the command line."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..store import WorkflowStore, build_from_directory

__all__ = ["add_store_commands"]


def add_store_commands(sub: Any, common: Any) -> None:
    """The ``knhk-memory store ...`` commands."""
    store = sub.add_parser("store", parents=[common], help="build and read workflow store files")
    ssub = store.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)

    b = ssub.add_parser("build", help="build a store from a directory of workflow definition files")
    b.add_argument("source", metavar="SOURCE", help="directory of definition files (any extension)")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="the store file to write")
    kg = b.add_mutually_exclusive_group()
    kg.add_argument("--key-regex", metavar="REGEX", help="take the key from the file: the first group "
                    "of REGEX (default: the path relative to SOURCE without extension)")
    kg.add_argument("--key-field", metavar="FIELD", help="take the key from a JSON file's top-level FIELD")
    b.add_argument("--last-wins", action="store_true", help="a repeated key keeps the last file")
    b.add_argument("--zstd", type=int, metavar="LEVEL", help="compress values with zstd at LEVEL")
    pg = b.add_mutually_exclusive_group()
    pg.add_argument("--progress", dest="progress", action="store_true", default=None,
                    help="always show a progress bar (default: for 2000+ files on a terminal)")
    pg.add_argument("--no-progress", dest="progress", action="store_false")
    b.set_defaults(func=_cmd_build)

    g = ssub.add_parser("get", help="write the value of KEY to standard output")
    g.add_argument("file", metavar="FILE")
    g.add_argument("key", metavar="KEY")
    g.set_defaults(func=_cmd_get)

    ls = ssub.add_parser("list", help="list the keys")
    ls.add_argument("file", metavar="FILE")
    ls.add_argument("-l", "--long", action="store_true", help="also the value size in bytes")
    ls.set_defaults(func=_cmd_list)

    v = ssub.add_parser("verify", help="check every checksum and index entry")
    v.add_argument("file", metavar="FILE")
    v.set_defaults(func=_cmd_verify)

    s = ssub.add_parser("stats", help="file size, keys, index load and overhead")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_stats)


def _cmd_build(args: Any) -> int:
    summary = build_from_directory(args.source, args.output, key_regex=args.key_regex,
                                   key_field=args.key_field, last_wins=args.last_wins,
                                   compress=args.zstd, progress=args.progress)
    print(f"wrote {summary['output']}: {summary['keys']} keys from {summary['files']} files, "
          f"{summary['file_size']} bytes")
    return 0


def _cmd_get(args: Any) -> int:
    with WorkflowStore(args.file) as s:
        value = s.get(args.key)
        if value is None:
            print(f"knhk-memory: {args.file}: key {args.key!r} not found", file=sys.stderr)
            return 1
        sys.stdout.flush()
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
    return 0


def _cmd_list(args: Any) -> int:
    with WorkflowStore(args.file) as s:
        for k, v in s.items():
            key = k.decode("utf-8", "backslashreplace")
            print(f"{len(v)}\t{key}" if args.long else key)
    return 0


def _cmd_verify(args: Any) -> int:
    with WorkflowStore(args.file) as s:
        n = s.verify()
        print(f"{args.file}: ok, {n} records checked ({len(s)} keys)")
    return 0


def _cmd_stats(args: Any) -> int:
    with WorkflowStore(args.file) as s:
        st = s.stats(deep=True)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        for k, v in st.items():
            print(f"{k:<20} {v}")
    return 0
