"""Reading what the programs leave behind: their logs (tail and follow) and the event listener's state record."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import deque
from pathlib import Path
from typing import Any

import click

from appliance.config import Appliance
from appliance.events import read_states

FOLLOW_POLL_S = 0.3


def recorded_states(appliance: Appliance) -> dict[str, dict[str, Any]]:
    return read_states(appliance.config.program_states_file)


NOT_A_LOG = "(left out: not a regular file; a link here could point at a secret)\n"


def tail(path: Path, lines: int) -> list[str]:
    """The last lines of a log; none if there is none. Never through a symlink or into a FIFO: this runs as root,
    and a link planted in LOG_DIR could point at the TLS key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: a FIFO must not hang the open
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return [NOT_A_LOG]
        raise
    with open(fd, errors="replace") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return [NOT_A_LOG]
        return list(deque(handle, maxlen=lines))


def show(paths: dict[str, Path], lines: int, follow: bool, *, prefix: bool) -> None:
    """Prints the last lines of each log, then (follow) new lines as they come, across supervisord's rotations."""
    def emit(name: str, line: str) -> None:
        click.echo(f"{name:<13}| {line}" if prefix else line, nl=not line.endswith("\n"))

    for name, path in paths.items():
        for line in tail(path, lines):
            emit(name, line)
    if not follow:
        return
    positions = {name: (_inode(path), path.stat().st_size if path.exists() else 0) for name, path in paths.items()}
    try:
        while True:
            for name, path in paths.items():
                inode, offset = positions[name]
                if not path.exists():
                    continue
                if _inode(path) != inode or path.stat().st_size < offset:
                    offset = 0  # rotated: supervisord moved the old file aside and started a new one
                with path.open(errors="replace") as handle:
                    handle.seek(offset)
                    for line in handle:
                        emit(name, line)
                    positions[name] = (_inode(path), handle.tell())
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        pass


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
