"""User-facing errors: one clear line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a preset): reported in one line, exit 2."""


@contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator:
    """Write a file via a temporary sibling and rename it into place, so a failure leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
