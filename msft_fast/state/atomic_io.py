"""Atomic writes: a reader (or a crash) never sees a half-written file or folder.

Files are created with the permissions the process umask gives, like `open()` does: a temporary
file from `tempfile.mkstemp` is always 0600, which would leave `history.json`, reports and the
exported model unreadable for teammates once renamed into place.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from typing import Any, Callable, IO


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7);
    elsewhere set and restored at once (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def apply_default_mode(path: str) -> None:
    """Give a file written by a library that creates it private (safetensors does) the mode a
    plain `open()` would have given it."""
    os.chmod(path, default_file_mode())


def create_temp_file(folder: str, prefix: str = ".tmp-", suffix: str = "") -> tuple[int, str]:
    """Like `tempfile.mkstemp(prefix, suffix, dir=folder)` (a new file, opened for writing, no
    other process can have it), but created with mode 0666 so that the umask decides, as for any
    file the user creates. Returns (fd, path)."""
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary file name in {folder}")


def write_file_atomic(path: str, fill: Callable[[IO[bytes]], Any], prefix: str = ".tmp-") -> None:
    """Write `path` through `fill(binary file)` into a temporary file beside it, then rename it
    into place. On any failure the temporary file is removed and `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = create_temp_file(folder, prefix=prefix, suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, allow_nan=True) + "\n"
    write_file_atomic(path, lambda f: f.write(text.encode("utf-8")))


def replace_dir_atomic(tmp_dir: str, final_dir: str) -> None:
    """Move a fully written `tmp_dir` to `final_dir`, replacing an older one."""
    old = None
    if os.path.exists(final_dir):
        old = final_dir.rstrip("/") + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
