"""Files only their owner may read (0600): secrets, keys, backups; written atomically, or streamed when too big."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def write_private_file(path: Path, text: str) -> None:
    """Writes a file only its owner can read (0600), atomically."""
    # Write-then-rename so an interrupted write never leaves a truncated password behind.
    tmp_path = path.with_name(path.name + ".tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # O_CREAT's mode does not apply to a leftover tmp file
        file.write(text + "\n")
        file.flush()
        os.fsync(file.fileno())  # a crash right after leaves the old file or the new one, never an empty one
    os.replace(tmp_path, path)


@contextmanager
def private_file(path: Path) -> Iterator[IO[bytes]]:
    """0600 from its first byte, streamed: dumps and archives are too big for write_private_file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as handle:
        yield handle


def private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
