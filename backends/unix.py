"""Unix-socket listening for the test backends (``--unix PATH``)."""

from __future__ import annotations

import contextlib
import os
import stat


def remove_stale_socket(path: str) -> None:
    """Remove the socket file at ``path``, left by a process that was killed, so that one
    restarted on the same path can bind it. Anything else there is left alone: binding then
    fails with the kernel's reason (EADDRINUSE)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
