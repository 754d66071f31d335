"""User-facing errors: one clear line on stderr, exit status 2, no traceback; and how user files are written."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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


def check_outputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None] = ()) -> None:
    """Before a command's work, in one line each: an output that is one of its inputs (it would be
    overwritten), a folder, named for two outputs, or under a file instead of a folder. So a mistake
    costs neither a file nor a run (`continue` wrote its MIDI file before finding its --wav path bad)."""
    given = [Path(path) for path in outputs if path is not None]
    sources = [Path(path) for path in inputs if path is not None]
    for index, output in enumerate(given):
        if output.is_dir():
            raise UserError(f"{output}: is a folder; give a file name")
        for source in sources:
            if _same_file(output, source):
                raise UserError(f"{output}: is the input {source}, which it would overwrite; give another file name")
        for earlier in given[:index]:
            if _same_file(output, earlier):
                raise UserError(f"{output}: named for two outputs; give each its own file")
        _folder_for(output)


def _same_file(first: Path, second: Path) -> bool:
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def _folder_for(path: Path) -> None:
    """UserError of one line if a file stands where a folder of `path` must be."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{path}: {folder} is a file, not a folder")


def _written_path(path: str | Path) -> Path:
    """Where a write to `path` lands: a symbolic link's target (the link stays a link), its folders
    made; a file in the way of a folder is one line."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    _folder_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _in_place(path: Path) -> bool:
    """A path that exists and is no regular file (/dev/null, a named pipe): written into as it is,
    never replaced by a renamed file (which would turn a device into a plain file)."""
    return path.exists() and not path.is_file() and not path.is_dir()


@contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator:
    """Write a file via a temporary sibling and rename it into place, so a failure leaves nothing behind.
    The file gets the permissions a plain open() would give it. Its bytes reach the disk before the
    rename: else a power cut soon after could leave the new name on an empty file. A symbolic link
    is written through; a device or named pipe is written into (`_in_place`)."""
    path = _written_path(path)
    if _in_place(path):
        with open(path, mode) as file:
            yield file
        return
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
    writing into it (safetensors renames its own private 0600 file over it) gets open()'s mode back.
    A device or named pipe at `path` gets the finished file's bytes copied into it."""
    path = _written_path(path)
    if _in_place(path):
        with tempfile.TemporaryDirectory(prefix="liveperceiver-") as scratch:
            temporary = Path(scratch) / path.name
            yield temporary
            with open(temporary, "rb") as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target)
        return
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


def unused_name(path: Path) -> Path:
    """`path`, or `name-2.mid`, `name-3.mid`, ... beside it if that is taken: a save never replaces a file."""
    candidate, number = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        number += 1
    return candidate
