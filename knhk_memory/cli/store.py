"""``knhk-memory store build|get|list|verify|stats``: workflow store files from the command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from ..errors import AmbiguousKeyError, StoreError, StoreKeyError
from ..store import WorkflowStore, _stored_key_text, build_from_directory
from . import write_all

__all__ = ["add_store_commands"]

ZSTD_LEVELS = (1, 22)


def _zstd_level(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer zstd level from {ZSTD_LEVELS[0]} to "
                                         f"{ZSTD_LEVELS[1]}, got {text!r}") from None
    if not ZSTD_LEVELS[0] <= v <= ZSTD_LEVELS[1]:
        raise argparse.ArgumentTypeError(f"must be a zstd level from {ZSTD_LEVELS[0]} to {ZSTD_LEVELS[1]}, "
                                         f"got {v}")
    return v


def _key_regex(text: str) -> str:
    try:
        pattern = re.compile(text.encode("utf-8", "surrogateescape"))
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {exc}") from None
    if pattern.groups < 1:
        raise argparse.ArgumentTypeError(f"{text!r} has no group; the key is the first group, e.g. "
                                         "'\"id\":\\s*\"([^\"]+)\"'")
    return text


MAX_VALUE_BYTES_LIMIT = 1 << 40  # the [store] max_value_bytes range (knhk_memory.config)
CAP_HINT = ("raise the cap with --max-value-bytes N after the subcommand, or [store] max_value_bytes in the "
            "config file (--config PATH, ./knhk.toml or $KNHK_MEMORY_CONFIG)")


def _max_value_bytes(text: str) -> int:
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of bytes from 1 to {MAX_VALUE_BYTES_LIMIT:,}, "
                                         f"got {text!r}") from None
    if not 1 <= v <= MAX_VALUE_BYTES_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a number of bytes from 1 to {MAX_VALUE_BYTES_LIMIT:,}, got {v:,}")
    return v


def _open(args: Any) -> WorkflowStore:
    """The store FILE opened with the decompression cap of --max-value-bytes, else of the
    config's [store] max_value_bytes (top-level or subcommand --config, $KNHK_MEMORY_CONFIG,
    ./knhk.toml, ...; knhk_memory.config.load_config)."""
    cap = args.max_value_bytes
    if cap is None:
        from ..config import load_config

        config = load_config(args.config)
        cap = config.store.max_value_bytes
        args.cap_source = f"[store] max_value_bytes = {cap} (from {config.source})"
    else:
        args.cap_source = f"--max-value-bytes {cap}"
    return WorkflowStore(args.file, max_value_bytes=cap)


def _with_cap_hint(exc: StoreError, args: Any) -> StoreError:
    """A value past the cap: the message says where this run's cap came from and how to
    raise it from the command line."""
    if exc.problem == "too-large":
        return type(exc)(f"{exc}; the cap here is {getattr(args, 'cap_source', 'the default')}; {CAP_HINT}",
                         problem=exc.problem)
    return exc


def _printable(key: bytes) -> str:
    """A key as one line of text: UTF-8 as is; other bytes and control characters
    (the NUL of the \\0knhk/ metadata keys, a newline, a tab) escaped, \\xNN."""
    text = key.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else c.encode(
        "unicode_escape").decode("ascii")) for c in text)


def add_store_commands(sub: Any, common: Any) -> None:
    """The ``knhk-memory store ...`` commands."""
    store = sub.add_parser("store", parents=[common], help="build and read workflow store files")
    ssub = store.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)

    b = ssub.add_parser("build", help="build a store from a directory of workflow definition files")
    b.add_argument("source", metavar="SOURCE", help="directory of definition files (any extension)")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="the store file to write")
    kg = b.add_mutually_exclusive_group()
    kg.add_argument("--key-regex", metavar="REGEX", type=_key_regex, help="take the key from the file: the first group "
                    "of REGEX (default: the path relative to SOURCE without extension)")
    kg.add_argument("--key-field", metavar="FIELD", help="take the key from a JSON file's top-level FIELD")
    b.add_argument("--key", metavar="TEMPLATE", help="key template, e.g. '{dir}/{stem}' or '{relpath}#{id}' "
                   "(fields: relpath path name stem ext dir id; {id} from --key-regex/--key-field, or the "
                   "process id with --spiff; default with --spiff: '{relpath}#{id}')")
    b.add_argument("--spiff", action="store_true", help="parse .bpmn/.dmn with SpiffWorkflow and store every "
                   "process spec ready to load (knhk-memory[spiff]; docs/adapters/spiff.md)")
    b.add_argument("--skip-invalid", action="store_true", help="with --spiff: build from what parses and list "
                   "what was skipped")
    b.add_argument("--codec", choices=("pickle5", "json"), default="pickle5", help="with --spiff: how specs are "
                   "stored (pickle5: fastest, the store is code; json: SpiffWorkflow's serializer)")
    b.add_argument("--last-wins", action="store_true", help="a repeated key keeps the last file")
    b.add_argument("--zstd", type=_zstd_level, metavar="LEVEL",
                   help=f"compress values with zstd at LEVEL ({ZSTD_LEVELS[0]}-{ZSTD_LEVELS[1]})")
    b.add_argument("--allow-empty", action="store_true",
                   help="build an empty store when SOURCE holds no files (otherwise an error)")
    pg = b.add_mutually_exclusive_group()
    pg.add_argument("--progress", dest="progress", action="store_true", default=None,
                    help="always show a progress bar (default: for 2000+ files on a terminal)")
    pg.add_argument("--no-progress", dest="progress", action="store_false")
    b.set_defaults(func=_cmd_build)

    reader = argparse.ArgumentParser(add_help=False, parents=[common])
    reader.add_argument("--max-value-bytes", type=_max_value_bytes, metavar="N", default=None,
                        help="largest size in bytes a compressed value may decompress to (default: [store] "
                             "max_value_bytes of the config, 67108864)")

    g = ssub.add_parser("get", parents=[reader], help="write the value of KEY (or of the record the alias KEY "
                        "names) to standard output")
    g.add_argument("file", metavar="FILE")
    g.add_argument("key", metavar="KEY")
    g.set_defaults(func=_cmd_get)

    ls = ssub.add_parser("list", parents=[reader], help="list the keys")
    ls.add_argument("file", metavar="FILE")
    ls.add_argument("-l", "--long", action="store_true", help="also the value size in bytes (from the record and "
                    "the zstd frame header; nothing is decompressed)")
    ls.add_argument("-a", "--all", action="store_true", help="also the metadata records (keys starting \\0knhk/, "
                    "printed \\x00knhk/)")
    ls.set_defaults(func=_cmd_list)

    v = ssub.add_parser("verify", parents=[reader], help="check every checksum and index entry")
    v.add_argument("file", metavar="FILE")
    v.set_defaults(func=_cmd_verify)

    s = ssub.add_parser("stats", parents=[reader], help="file size, keys, index load and overhead")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_stats)


def _cmd_build(args: Any) -> int:
    if args.spiff:
        from ..adapters.spiff import build_spiff_main

        return build_spiff_main(args)
    summary = build_from_directory(args.source, args.output, key_template=args.key, key_regex=args.key_regex,
                                   key_field=args.key_field, last_wins=args.last_wins, compress=args.zstd,
                                   progress=args.progress, allow_empty=args.allow_empty)
    for key, earlier, later in summary["replaced"]:
        print(f"knhk-memory: --last-wins: key {key!r}: {later!r} replaced {earlier!r}", file=sys.stderr)
    print(f"wrote {summary['output']}: {_plural(summary['keys'], 'key')} from {_plural(summary['files'], 'file')}, "
          f"{_plural(summary['file_size'], 'byte')}")
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cmd_get(args: Any) -> int:
    with _open(args) as s:
        try:
            value = s.get_bytes(args.key)  # a key, or the one record an alias names
        except StoreError as exc:
            if isinstance(exc, AmbiguousKeyError):
                raise
            raise _with_cap_hint(exc, args) from None
        if value is None:
            try:
                s.resolve(args.key)
            except AmbiguousKeyError:
                raise
            except StoreKeyError as exc:  # the message lists the nearest names
                nearest = str(exc).partition("; nearest: ")[2]
                print(f"knhk-memory: {args.file}: key {args.key!r} not found (neither a key nor an alias"
                      + (f"; nearest: {nearest})" if nearest else ")"), file=sys.stderr)
                return 1
            print(f"knhk-memory: {args.file}: key {args.key!r} not found", file=sys.stderr)
            return 1
        if _stdout_is_a_terminal() and _is_binary(value):
            # As curl does: control bytes would drive the terminal, not show the value.
            print(f"knhk-memory store get: error: the value of {args.key!r} is binary ({len(value):,} bytes: "
                  "not UTF-8 text, or control bytes in it) and standard output is a terminal; redirect it "
                  "(> FILE) or pipe it (| xxd)", file=sys.stderr)
            return 2
        write_all(value)
    return 0


def _is_binary(value: bytes) -> bool:
    """Bytes that would not show as text: not UTF-8, or a control byte other than tab/newline/CR."""
    data = bytes(value)
    if _CONTROL.search(data):
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _stdout_is_a_terminal() -> bool:
    try:
        return os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a replaced sys.stdout (tests)
        return False


def _value_size(s: WorkflowStore, compressed: bool, key: bytes) -> int | None:
    """The size of ``key``'s value in bytes from the record (uncompressed) or the zstd frame
    header (compressed): nothing is decompressed, so a value past the cap still lists.
    None: the value is not a zstd frame with a recorded size."""
    raw = s.get_raw(key)
    if not compressed:
        return len(raw)
    import zstandard

    try:
        size = zstandard.frame_content_size(raw)
    except zstandard.ZstdError:
        return None
    return size if size >= 0 else None


def _cmd_list(args: Any) -> int:
    bad = 0
    with _open(args) as s:
        compressed = s.stats()["compression"] != "none"
        for k in s:
            if k.startswith(b"\0knhk/") and not args.all:  # the record layer's metadata (docs/store.md)
                continue
            key = _printable(k)
            if not args.long:
                print(key)
                continue
            size = _value_size(s, compressed, k)
            if size is None:
                bad += 1
                sys.stdout.flush()
                print(f"knhk-memory: error: {args.file}: the value of key {_stored_key_text(k)} is not a zstd "
                      "frame with a "
                      "recorded size (the header says values are compressed); listed with size ?",
                      file=sys.stderr)
            print(f"{'?' if size is None else size}\t{key}")
    if bad:
        print(f"knhk-memory: error: {args.file}: {bad} of the values listed have no readable size; "
              "`knhk-memory store verify` checks every record", file=sys.stderr)
        return 2
    return 0


def _cmd_verify(args: Any) -> int:
    with _open(args) as s:
        n = s.verify()
        print(f"{args.file}: ok, {n} records checked ({len(s)} keys)")
    return 0


def _cmd_stats(args: Any) -> int:
    with _open(args) as s:
        st = s.stats(deep=True)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        for k, v in st.items():
            print(f"{k:<20} {v}")
    return 0
