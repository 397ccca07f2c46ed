"""The shared-memory segments knhk made: who made them, who still uses them, and
reclaiming the ones a killed creator left behind.

A shared :class:`~knhk_memory.counters.Counters`, :class:`~knhk_memory.counters.PatternStats`
or :class:`~knhk_memory.metrics.Metrics` block lives in ``/dev/shm/NAME`` (or a
file) until its creator closes it. A creator killed with SIGKILL cannot close
it, so the segment stays. This module decides, from the segment alone, whether
it is a *leftover* that may be removed:

- it is a knhk block: its header starts with the counter magic ``KNHCNTR1`` or
  the metrics magic ``KNHHMTR1`` and says it is formatted;
- it belongs to the user asking (its file owner is the effective uid);
- its creator is gone: the header records the creator's pid (byte 92 of the
  counter header; of the metrics block's embedded counter header) and, since
  issue 22, the creator's start time (the next 8 bytes: ``starttime``, field 22
  of ``/proc/PID/stat``, clock ticks after boot). A pid that exists but started
  at another time is a reused pid, so the creator is gone. A block with no
  start time (made by an older build) counts its creator as alive while the
  pid exists;
- no process maps it: every readable ``/proc/PID/maps`` is searched for the
  segment's device and inode, so workers still attached to the block of a
  dead creator keep it. (Processes of other users whose maps this user cannot
  read are not seen; a block has mode 0o600 unless ``[counters] mode`` says
  otherwise, so they cannot map it either, root excepted.)

:func:`reclaim_for_create` is what a new block calls when its name is taken;
``knhk-memory shm gc`` calls :func:`list_segments` and :func:`reclaim`.
Linux only (``/proc``); elsewhere nothing is ever a leftover.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass, field

__all__ = ["SHM_DIR", "Segment", "inspect", "list_segments", "reclaim", "reclaim_for_create",
           "process_start_time", "creator_stamp", "mapped_by", "maps_all"]

SHM_DIR = "/dev/shm"
COUNTERS_MAGIC = b"KNHCNTR1"
METRICS_MAGIC = b"KNHHMTR1"
CREATOR_PID_AT = 92  # block_header.creator_pid (native/counters.c asserts the offset)
CREATOR_START_AT = 96  # 8 bytes of header padding (names start at 128): the creator's start time
_READY_AT = 88  # block_header.ready
_FLAVOR_AT = 16
_METRICS_COUNTERS_OFF_AT = 64  # metrics_header.counters_off (native/metrics.c)
_METRICS_READY_AT = 96
_HEAD = 128
_FLAVORS = {1: "counters", 2: "patterns"}  # KNHK_COUNTERS_FLAVOR_SUM / _PATTERNS
log = logging.getLogger("knhk_memory")


def process_start_time(pid: int) -> int | None:
    """``starttime`` of process ``pid`` (clock ticks after boot, field 22 of
    ``/proc/PID/stat``), or None when no such process exists (or no /proc)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError:  # pragma: no cover - /proc hidden (hidepid): it exists, time unknown
        return 0
    try:  # the command name (field 2) is in parentheses and may hold anything: split after the last ')'
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):  # pragma: no cover - a kernel with another format
        return 0


def creator_stamp() -> bytes:
    """This process's start time as the 8 little-endian bytes stored at
    :data:`CREATOR_START_AT` (0 when unknown: the block then counts as the
    creator's while its pid exists)."""
    return (process_start_time(os.getpid()) or 0).to_bytes(8, "little")


def stamp(mm: bytearray | memoryview | object, header_at: int = 0) -> None:
    """Write the creator's start time into the counter header at ``header_at`` of
    the mapping ``mm`` (a block this process just formatted)."""
    mm[header_at + CREATOR_START_AT:header_at + CREATOR_START_AT + 8] = creator_stamp()  # type: ignore[index]


def pid_alive(pid: int, start: int) -> bool:
    """Is process ``pid``, started at ``start`` (0: unknown), still running?"""
    if not 0 < pid < 1 << 22:  # pid_max is at most 2^22; 0 and others never name a process
        return False
    now = process_start_time(pid)
    if now is None:
        if not os.path.isdir("/proc/self"):  # pragma: no cover - no /proc: ask the kernel
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return False
    return start == 0 or now == 0 or now == start


def mapped_by(st: os.stat_result) -> list[int]:
    """Pids of the processes whose ``/proc/PID/maps`` show the file ``st`` (by device
    and inode) mapped; processes whose maps cannot be read are skipped."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    ino = str(st.st_ino)
    found: list[int] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # pragma: no cover - no /proc
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) >= 5 and parts[4] == ino and parts[3] == dev:
                        found.append(pid)
                        break
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def maps_all(pid: int, files: list[os.stat_result]) -> bool:
    """Does process ``pid`` map every one of ``files`` (by device and inode, so a file
    already unlinked still counts)? False when its maps cannot be read."""
    want = {(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", str(st.st_ino)) for st in files}
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) >= 5:
                    want.discard((parts[3], parts[4]))
                    if not want:
                        return True
    except OSError:
        return False
    return not want


@dataclass
class Segment:
    """One file inspected as a knhk block.

    ``kind``: "counters", "patterns", "metrics", or None (not a knhk block; ``why``
    says what it is). ``creator_pid`` 0: not recorded. ``creator_start`` 0: not
    recorded (an older build). ``mapped_by``: pids mapping it now.
    """

    path: str
    kind: str | None
    size: int
    uid: int
    ino: int
    dev: int
    creator_pid: int = 0
    creator_start: int = 0
    creator_alive: bool = False
    mapped_by: list[int] = field(default_factory=list)
    why: str = ""

    @property
    def name(self) -> str:
        """The shared-memory name (the file name under /dev/shm) or the path."""
        d, base = os.path.split(self.path)
        return base if d == SHM_DIR else self.path

    @property
    def user(self) -> str:
        return user_name(self.uid)

    @property
    def ours(self) -> bool:
        return self.uid == os.geteuid()

    @property
    def leftover(self) -> bool:
        """A knhk block of this user whose creator is gone and which no process maps."""
        return (self.kind is not None and self.ours and self.creator_pid != 0 and not self.creator_alive
                and not self.mapped_by)

    @property
    def state(self) -> str:
        """One phrase: why it is (or is not) a leftover."""
        if self.kind is None:
            return f"not a knhk block ({self.why})"
        if not self.ours:
            return f"belongs to {self.user} (uid {self.uid})"
        if self.creator_alive:
            return f"in use: its creator, pid {self.creator_pid}, is running"
        if self.mapped_by:
            return (f"in use: its creator pid {self.creator_pid} is gone, but pid(s) "
                    f"{', '.join(map(str, self.mapped_by))} map it")
        if self.creator_pid == 0:
            return "its creator is not recorded (a block of an older build): remove it by hand if unused"
        return f"leftover: its creator, pid {self.creator_pid}, is gone and no process maps it"

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "path": self.path, "kind": self.kind, "bytes": self.size, "uid": self.uid,
                "user": self.user, "creator_pid": self.creator_pid, "creator_alive": self.creator_alive,
                "mapped_by": self.mapped_by, "leftover": self.leftover, "state": self.state}


def user_name(uid: int) -> str:
    """The account name of ``uid``, or ``uid N`` when it has none."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid {uid}"


def owner_text(uid: int) -> str:
    """``"nobody (uid 65534)"``: how messages name a block's owner."""
    name = user_name(uid)
    return name if name.startswith("uid ") else f"{name} (uid {uid})"


def _u32(b: bytes, at: int) -> int:
    return int.from_bytes(b[at:at + 4], "little")


def _u64(b: bytes, at: int) -> int:
    return int.from_bytes(b[at:at + 8], "little")


def inspect(path: str, *, scan_maps: bool = True) -> Segment | None:
    """The segment at ``path`` (None when nothing is there). Never follows a
    symlink; reads at most the headers (under 256 bytes), never maps the file.

    :raises OSError: the path exists but cannot be opened (e.g. PermissionError).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink, never ours
            st = os.lstat(path)
            return Segment(path, None, st.st_size, st.st_uid, st.st_ino, st.st_dev, why="a symbolic link")
        if isinstance(exc, PermissionError):  # another user's block: owner from the directory entry
            st = os.lstat(path)
            seg = Segment(path, None, st.st_size, st.st_uid, st.st_ino, st.st_dev, why="unreadable: "
                          "another user's, or its mode does not let this user read it")
            return seg
        raise
    try:
        st = os.fstat(fd)
        seg = Segment(path, None, st.st_size, st.st_uid, st.st_ino, st.st_dev)
        if not stat.S_ISREG(st.st_mode):
            seg.why = "not a regular file"
            return seg
        head = os.pread(fd, _HEAD, 0)
        at = 0
        if head[:8] == COUNTERS_MAGIC and len(head) >= _HEAD and _u32(head, _READY_AT) == 1:
            seg.kind = _FLAVORS.get(_u32(head, _FLAVOR_AT))
        elif head[:8] == METRICS_MAGIC and len(head) >= _HEAD and _u32(head, _METRICS_READY_AT) == 1:
            at = _u64(head, _METRICS_COUNTERS_OFF_AT)
            if 0 < at <= st.st_size - _HEAD:
                inner = os.pread(fd, _HEAD, at)
                if inner[:8] == COUNTERS_MAGIC and len(inner) == _HEAD:
                    seg.kind, head = "metrics", inner
        if seg.kind is None:
            seg.why = "no knhk header" if head[:8] not in (COUNTERS_MAGIC, METRICS_MAGIC) else \
                "a knhk header that is not complete (its creator died while making it?) or not valid"
            return seg
        seg.creator_pid = _u32(head, CREATOR_PID_AT)
        seg.creator_start = _u64(head, CREATOR_START_AT)
    finally:
        os.close(fd)
    seg.creator_alive = pid_alive(seg.creator_pid, seg.creator_start)
    if scan_maps and not seg.creator_alive:
        seg.mapped_by = mapped_by(st)
    return seg


def list_segments(prefix: str = "", directory: str = SHM_DIR) -> list[Segment]:
    """The knhk blocks in ``directory`` (default /dev/shm) whose names start with
    ``prefix``, sorted by name; files that are not knhk blocks are left out,
    and so are names that vanish meanwhile or cannot be opened by this user
    (unless they are this user's)."""
    out: list[Segment] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return out
    for n in names:
        if not n.startswith(prefix):
            continue
        try:
            seg = inspect(os.path.join(directory, n))
        except OSError:
            continue
        if seg is not None and seg.kind is not None:
            out.append(seg)
    return out


def reclaim(seg: Segment) -> bool:
    """Remove the leftover ``seg`` (checked again just before: same inode, still a
    leftover). True if this call removed it."""
    again = inspect(seg.path)
    if again is None or again.ino != seg.ino or again.dev != seg.dev or not again.leftover:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(seg.path)
        return True
    return False


def reclaim_for_create(path: str) -> tuple[Segment | None, Segment | None]:
    """The name ``path`` is taken and a new block wants it: remove it if it is a
    leftover. Returns ``(removed, present)``: the leftover removed (logged as a
    warning on the ``knhk_memory`` logger), or what is there and stays, for the
    caller's message; both None when the name went away meanwhile.

    :raises OSError: it cannot be inspected (the caller says so).
    """
    seg = inspect(path)
    if seg is None:
        return None, None
    if seg.leftover and reclaim(seg):
        log.warning("removed the leftover shared block %s (%s, %d bytes): its creator, pid %d, is gone and no "
                    "process maps it", seg.path, seg.kind, seg.size, seg.creator_pid)
        return seg, None
    return None, seg
