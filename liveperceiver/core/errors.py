"""User-facing errors: one clear line on stderr, exit status 2, no traceback; and how user files are written."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a preset): reported in one line, exit 2."""


def _new_sibling(path: Path) -> tuple[int, Path]:
    """A new temporary file next to `path`, created as a plain open() creates files (0666 & ~umask, and
    the folder's default ACL), not mkstemp's private 0600: a DAW or file manager running as another
    user must be able to read what a user saves. The name is random, the creation exclusive."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator:
    """Write a file via a temporary sibling and rename it into place, so a failure leaves nothing behind.
    The file gets the permissions a plain open() would give it. Its bytes reach the disk before the
    rename: else a power cut soon after could leave the new name on an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _new_sibling(path)
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """atomic_output for writers that take a file name (FluidSynth, safetensors): they write the
    yielded temporary path, which then replaces `path`. A writer that replaces the file instead of
    writing into it (safetensors renames its own private 0600 file over it) gets open()'s mode back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _new_sibling(path)
    try:
        mode = os.fstat(handle).st_mode & 0o7777
        os.close(handle)
        yield temporary
        if os.stat(temporary).st_mode & 0o7777 != mode:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
