"""Private files (keys): created atomically with mode 0600 in a 0700 folder, never replacing an existing one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Create `path` holding `data`, readable by this user only; raises FileExistsError if it exists. A reader never
    sees a half-written file: the bytes go to a temporary file first, which is then linked into place."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it with mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.link(tmp, path)  # fails if `path` exists, unlike a rename
    finally:
        os.unlink(tmp)
