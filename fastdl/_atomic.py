"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it.

The temporary file is named ``.<target name>.<host>-<pid>-<random>.tmp``
(``host`` = 8 hex digits of a hash of this machine's name). A writer killed
mid-save (SIGKILL, power loss) leaves it behind; the next save of the same
target removes such leftovers, but only those written on this machine by a
process that no longer exists: a concurrent saver's temporary file is never
touched, and neither is one from another machine sharing the directory
(its process cannot be checked from here).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import sys
from pathlib import Path
from typing import BinaryIO, Callable

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _temp_pattern(name: str) -> "re.Pattern[str]":
    return re.compile(rf"\.{re.escape(name)}\.([0-9a-f]{{8}})-(\d{{1,10}})-[0-9a-f]{{8}}\.tmp")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (True when that cannot be determined)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        try:
            import ctypes

            kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
            handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
            if not handle:
                return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            kernel32.CloseHandle(handle)
            return code.value == 259  # STILL_ACTIVE
        except Exception:  # noqa: BLE001 - cannot tell: treat as alive (never delete a live saver's file)
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process) or cannot tell
    return True


def remove_stale_temps(path: "str | os.PathLike") -> list[Path]:
    """Delete temporary files of ``path`` left by dead writers on this machine; returns what was removed."""
    path = Path(path)
    pattern = _temp_pattern(path.name)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or m.group(1) != _HOST or pid_alive(int(m.group(2))):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:  # another saver cleaned it up first
            pass
        except OSError:  # e.g. permissions: leaving it is harmless
            pass
    return removed


def check_target(path: "str | os.PathLike") -> Path:
    """Raise what :func:`atomic_write` would raise for ``path``'s location, without writing anything.

    For callers that write at the END of long work (a CLI ``--save``, a
    checkpoint path): check first, so a typo does not cost the whole run.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "cannot save: the target is a directory", str(path))
    if not parent.is_dir():
        if parent.exists():
            raise NotADirectoryError(errno.ENOTDIR, f"cannot save {path.name!r}: not a directory", str(parent))
        raise FileNotFoundError(errno.ENOENT, f"cannot save {path.name!r}: no such directory (fastdl does not "
                                "create directories; create it first)", str(parent))
    return path


def atomic_write(path: "str | os.PathLike", write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash, error or kill mid-write leaves any previous file at ``path`` intact
    (on errors and interrupts the temporary file is removed at once; after a
    kill, by the next save of ``path``). The directory must exist:
    ``FileNotFoundError`` names it otherwise, as ``np.save`` does (a typo must
    not create directories). ``IsADirectoryError`` if ``path`` is a directory.
    Permissions follow the umask, as for a normal file.
    """
    path = check_target(path)
    parent = path.parent
    remove_stale_temps(path)
    tmp = parent / f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except IsADirectoryError:  # a directory appeared at path meanwhile: name the target, not tmp
            raise IsADirectoryError(errno.EISDIR, "cannot save: the target is a directory", str(path)) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
