"""Writing files and directories so that a crash never leaves a half-written result at the final path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nvila_ft.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """The folder a result is written to exists already (choose another, or allow overwriting)."""


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling temp directory; on success it replaces `path` in one rename.

    An existing `path` is an error unless `overwrite`; then it is moved aside first and removed only once
    the new directory is in place. On failure the temp directory is removed and `path` is untouched.
    """
    final = Path(path).absolute()
    if final.exists() and not overwrite:
        raise OutputExistsError(f"{final} already exists (pass overwrite=True to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = final.parent / f".{final.name}.tmp-{token}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        backup = None
        if final.exists():
            if not overwrite:  # another process wrote it meanwhile: theirs stays (readers may be using it)
                raise OutputExistsError(f"{final} was written by another process meanwhile")
            backup = final.parent / f".{final.name}.old-{token}"
            os.replace(final, backup)
        os.replace(staging, final)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, final)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON as transformers writes configs (sorted keys, two-space indent, trailing newline)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
