"""What the test backends' command lines share: where to listen, and running until a signal."""

from __future__ import annotations

import argparse
import asyncio
import signal


def add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    """``--host`` and one of ``--port`` (0 picks a free port) or ``--unix PATH``."""
    parser.add_argument("--host", default="127.0.0.1")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="0 picks a free port")
    where.add_argument("--unix", metavar="PATH", help="listen on this unix socket instead")


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call it from the running loop): the backend's cue
    to drain and exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
