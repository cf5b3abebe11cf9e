"""Files written so that a crash or a full disk loses nothing: atomic replacement, and the one-line
reason a write failed."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

# What a failed write raises: OSError from Python's own file I/O, SafetensorError from
# safetensors' writer, RuntimeError from torch.save's (neither of the last two is an OSError).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def write_failure(err: BaseException, folder: Path) -> str:
    """'disk full (reason)' or 'could not write (reason)', for the one-line error about a failed
    write into `folder` (call before removing what the write left: torch.save's error does not
    say why it failed, so a full disk is also recognised by its free space)."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "os error 28" in str(err)
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(folder).free == 0
    return f"{'disk full' if full else 'could not write'} ({getattr(err, 'strerror', None) or err})"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_folder(folder: Path) -> None:
    """Rename it aside first, so a kill mid-delete never leaves a half folder under a real name."""
    trash = folder.with_name(f".trash-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
