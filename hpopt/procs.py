"""Is a recorded local process still ours? (local-mode DB server and workers record pids)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def process_alive(pid: int | None, is_ours: Callable[[list[str]], bool]) -> bool:
    """True while `pid` runs a process whose argv `is_ours` accepts.

    Zombies and strangers that reused the pid count as gone, so a stale record never makes
    hpopt signal or wait on someone else's process. Without /proc only existence is checked.
    """
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.parent.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and is_ours(argv)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
