"""Start a process, wait until it announces that it is ready, stop it: the one launcher.

The protocol. A launched process announces readiness on its stdout (``READY <port>`` from a
backend, the start banner from the router: ``router.protocol.announce`` formats and parses
both). The launcher reads stdout line by line and gives the latest ``TAIL_LINES`` lines to a
*ready reader*: a pure function that returns what the process announced once the lines hold
it, and None until then (``announce.ready_port``, ``announce.parse_banner``). It is asked
once before any line too, so a reader that answers on no lines (``started``) means "ready
once spawned", for a program that announces nothing. Lines that are not the announcement
are kept and skipped. The wait is bounded: when ``ready_timeout_s`` passes, or the process
closes its stdout first, it is killed and reaped and ``SpawnError`` says why with the tail
of its stdout (and of its stderr, when that goes to a file).

After readiness stdout is read to its end by a task the process owns, so a child never
blocks on a full pipe: every line goes to the log file (when one is given) and the last
``TAIL_LINES`` stay in memory for error messages and tests.

Stopping: SIGTERM (the router and the backends drain on it), a wait of at most
``timeout_s``, then SIGKILL; the process is always reaped, and its log file closed.
``kill`` without waiting is the forced exit.

One implementation, two drivers: ``launch`` runs on the caller's event loop (the router's
spawner and supervisor, async tests); ``launch_blocking`` runs the same coroutines on an
event loop of its own, on a thread, for blocking code (bench, chaos, test fixtures), behind
methods named and shaped like ``subprocess.Popen``'s.

The child's half: ``die_with_parent`` (Linux ``PR_SET_PDEATHSIG``), for a process that must
not outlive the process that launched it (the supervisor's router processes call it); for a
program that cannot call it, ``launch(..., die_with_parent=SIGNAL)`` runs it behind a prelude
that sets it and then executes the program (``guarded``; the replica manager's replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar

from router.core.errors import SpawnError, quoted

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The recent stdout lines a ready reader sees and an error message quotes; the router's
# banner, the longest announcement, is 5 lines.
TAIL_LINES = 40
TAIL_LINE_CHARS = 200  # longer output lines are shortened in the error
# A Python process (router or backend) is ready in well under a second; a loaded 2-core
# machine has taken several, so the default leaves a wide margin.
READY_TIMEOUT_S = 20.0
# SIGTERM to SIGKILL. Callers that stop a router give it its drain grace on top.
STOP_TIMEOUT_S = 5.0
# How long stdout may stay open after the process exited (a grandchild that inherited it)
# before the reader is cancelled.
OUTPUT_DRAIN_S = 1.0
# The last bytes of a stderr file read for an error message.
STDERR_TAIL_BYTES = 8192

ReadyReader = Callable[[Sequence[str]], T | None]


class LogSink(Protocol):
    """Where a process's output lines go: a file opened for appending, or anything that
    writes, flushes and closes like one."""

    @property
    def name(self) -> Any: ...

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

# Where stderr goes: a file path (opened for append, quoted in errors), an open file, a
# ``subprocess`` constant such as STDOUT or DEVNULL, or None (inherited).
Stderr = Path | IO[Any] | int | None


# -- ready readers ---------------------------------------------------------------------------


def started(lines: Sequence[str]) -> bool:
    """Ready as soon as the process exists (a program that announces nothing)."""
    return True


# -- the asyncio implementation ---------------------------------------------------------------


class _Output:
    """One process's stdout, read line by line into a tail and, optionally, a log file."""

    def __init__(self, stream: asyncio.StreamReader, log_file: LogSink | None,
                 on_line: Callable[[str], None] | None = None) -> None:
        self._stream = stream
        self._log_file = log_file
        self._on_line = on_line
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    async def next_line(self) -> str | None:
        """The next line without its newline; None at end of file."""
        try:
            raw = await self._stream.readline()
        except ValueError:  # over the stream's 64 KiB line limit; the reader dropped it
            raw = b"<a line over 64 KiB, dropped>\n"
        if not raw:
            return None
        if self._log_file is not None:
            try:
                self._log_file.write(raw)
                self._log_file.flush()
            except OSError as exc:  # a full disk must not stop the draining of the pipe
                log.warning("cannot write %s (%s); output no longer logged",
                            self._log_file.name, exc)
                self._log_file = None
        line = raw.decode(errors="replace").rstrip("\r\n")
        self.tail.append(line)
        if self._on_line is not None:
            self._on_line(line)
        return line

    async def drain(self) -> None:
        """Read to the end of file, then close the log."""
        while await self.next_line() is not None:
            pass
        self.close()

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class LaunchedProcess(Generic[T]):
    """A process that announced it was ready; ``ready`` is what it announced.

    Owns the task that reads the rest of its stdout. The event loop reaps the process
    whenever it exits; ``stop`` makes it exit and ends the reading task.
    """

    def __init__(self, argv: tuple[str, ...], process: asyncio.subprocess.Process,
                 ready: T, output: _Output) -> None:
        self.argv = argv
        self.ready = ready
        self.killed = False  # stop() had to SIGKILL it
        self._process = process
        self._output = output
        self._reader = asyncio.create_task(output.drain(), name=f"stdout of pid {process.pid}")

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def output_tail(self) -> list[str]:
        """The last ``TAIL_LINES`` lines of stdout read so far."""
        return list(self._output.tail)

    async def wait(self) -> int:
        return await self._process.wait()

    def send_signal(self, signum: int) -> None:
        """Signal the process; nothing when it has exited (and been reaped)."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait at most ``timeout_s``, then SIGKILL; reaped; returns the exit code."""
        self.terminate()
        try:
            async with asyncio.timeout(timeout_s):
                code = await self._process.wait()
        except TimeoutError:
            log.warning("pid %d (%s) still running %.1fs after SIGTERM: killing",
                        self.pid, self.argv[0], timeout_s)
            self.killed = True
            self.kill()
            code = await self._process.wait()
        await self._close_output()
        return code

    async def _close_output(self) -> None:
        try:
            async with asyncio.timeout(OUTPUT_DRAIN_S):
                await self._reader  # cancelled by the timeout if a grandchild holds the pipe
        except TimeoutError:
            pass
        self._output.close()

    def statistics(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "pid": self.pid, "returncode": self.returncode,
                "killed": self.killed}

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"LaunchedProcess(pid={self.pid}, {state}, argv={self.argv[:3]!r})"


def _stderr_target(stderr: Stderr) -> tuple[IO[Any] | int | None, Path | None, bool]:
    """(what the child gets, the file to quote in errors, whether we opened it)."""
    if isinstance(stderr, Path):
        stderr.parent.mkdir(parents=True, exist_ok=True)
        return stderr.open("ab"), stderr, True
    name = getattr(stderr, "name", None)
    return stderr, Path(name) if isinstance(name, str) else None, False


def _file_tail(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - STDERR_TAIL_BYTES))
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-TAIL_LINES:]


def _failure(argv: tuple[str, ...], why: str, output: _Output, stderr_path: Path | None,
             ) -> SpawnError:
    parts = [f"{shlex.join(argv)}: {why}"]
    tails = [("stdout", list(output.tail))]
    if stderr_path is not None:
        tails.append((f"stderr ({stderr_path})", _file_tail(stderr_path)))
    for name, lines in tails:
        clipped = [_clip(line) for line in lines]
        parts.append(f"last {name} lines:\n    " + "\n    ".join(clipped) if lines
                     else f"no {name} output")
    return SpawnError("\n  ".join(parts))


def _clip(line: str) -> str:
    """A line of the process's output as it is, or shortened (a process may print anything)."""
    return line if len(line) <= TAIL_LINE_CHARS else quoted(line, TAIL_LINE_CHARS)


async def _await_ready(output: _Output, ready: ReadyReader[T], timeout_s: float) -> T | None:
    """What the process announced; None if its stdout ended first. Raises TimeoutError."""
    async with asyncio.timeout(timeout_s):
        while (value := ready(output.tail)) is None:
            if await output.next_line() is None:
                return None
        return value


async def launch(
    argv: Sequence[str], ready: ReadyReader[T], *, env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None, stderr: Stderr = None,
    log_path: Callable[[int], Path] | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
    new_session: bool = False, log_file: LogSink | None = None,
    on_line: Callable[[str], None] | None = None, die_with_parent: int | None = None,
) -> LaunchedProcess[T]:
    """Start ``argv`` and return it once ``ready`` finds its announcement.

    ``log_path(pid)``: the file that gets all of its stdout; or ``log_file``, an open one
    (closed when the process ends). ``on_line``: told every line of stdout, before and after
    readiness. ``new_session``: its own session, so a Ctrl-C on the launcher's terminal
    reaches the launcher only (which then stops it). ``die_with_parent``: the signal the
    process gets when this one dies, even by SIGKILL (Linux; see ``guarded``). Raises
    ``SpawnError`` (the process killed and reaped) or ``OSError`` (not started).
    """
    args = tuple(argv)
    exec_args = guarded(args, die_with_parent) if die_with_parent is not None else args
    child_stderr, stderr_path, opened = _stderr_target(stderr)
    try:
        process = await asyncio.create_subprocess_exec(
            *exec_args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=child_stderr,
            env=None if env is None else dict(env), cwd=cwd, start_new_session=new_session,
        )
    finally:
        if opened:
            assert not isinstance(child_stderr, int) and child_stderr is not None
            child_stderr.close()  # the child has its own copy
    assert process.stdout is not None
    output = _Output(process.stdout, log_file, on_line)
    try:
        if log_path is not None:
            path = log_path(process.pid)
            path.parent.mkdir(parents=True, exist_ok=True)
            output = _Output(process.stdout, path.open("ab"), on_line)
        value = await _await_ready(output, ready, ready_timeout_s)
    except TimeoutError:
        await _abort(process, output)
        raise _failure(args, f"announced nothing within {ready_timeout_s}s; killed",
                       output, stderr_path) from None
    except BaseException:
        await _abort(process, output)
        raise
    if value is None:  # stdout ended: it is exiting, or it closed stdout and lives on
        exited = await _abort(process, output, grace_s=OUTPUT_DRAIN_S)
        why = (f"exited with status {process.returncode} before it was ready" if exited
               else "closed its stdout before it was ready; killed")
        raise _failure(args, why, output, stderr_path)
    return LaunchedProcess(args, process, value, output)


async def _abort(process: asyncio.subprocess.Process, output: _Output,
                 grace_s: float = 0.0) -> bool:
    """A process that did not get ready: let it exit within ``grace_s``, else SIGKILL;
    reaped, log closed. True if it exited by itself."""
    if grace_s > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await process.wait()
    exited = process.returncode is not None
    if not exited:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await process.wait()
    output.close()
    return exited


# -- the blocking driver ----------------------------------------------------------------------


class _LoopThread:
    """An event loop running on a daemon thread, for blocking callers to submit work to."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, R], timeout_s: float | None = None) -> R:
        """Run ``coro`` on the loop and wait for its result; TimeoutError cancels it."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class BlockingProcess(Generic[T]):
    """A ``LaunchedProcess`` driven from blocking code. Its methods block until done on the
    process's own loop thread (``wait`` at most ``timeout``, raising
    ``subprocess.TimeoutExpired`` as ``Popen.wait`` does); ``stop`` also ends the thread."""

    def __init__(self, thread: _LoopThread, launched: LaunchedProcess[T]) -> None:
        self._thread = thread
        self._launched = launched

    @property
    def ready(self) -> T:
        return self._launched.ready

    @property
    def argv(self) -> tuple[str, ...]:
        return self._launched.argv

    @property
    def pid(self) -> int:
        return self._launched.pid

    @property
    def returncode(self) -> int | None:
        return self._launched.returncode

    @property
    def killed(self) -> bool:
        return self._launched.killed

    def poll(self) -> int | None:
        return self._launched.returncode

    def output_tail(self) -> list[str]:
        return self._launched.output_tail()

    def wait(self, timeout: float | None = None) -> int:
        if (code := self.returncode) is not None:
            return code
        try:
            return self._thread.run(self._launched.wait(), timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(list(self.argv), timeout or 0.0) from None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            self._thread.run(_call(self._launched.send_signal, signum))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """``LaunchedProcess.stop``, then the loop thread ends. Safe to call again."""
        if not self._thread.loop.is_closed():
            self._thread.run(self._launched.stop(timeout_s))
            self._thread.close()
        code = self.returncode
        assert code is not None
        return code

    def statistics(self) -> dict[str, Any]:
        return self._launched.statistics()

    def __enter__(self) -> BlockingProcess[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Blocking{self._launched!r}"


async def _call(function: Callable[[int], None], argument: int) -> None:
    function(argument)


def launch_blocking(
    argv: Sequence[str], ready: ReadyReader[T], *, env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None, stderr: Stderr = None,
    log_path: Callable[[int], Path] | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
    new_session: bool = False,
) -> BlockingProcess[T]:
    """``launch`` for blocking code: same arguments, same errors; call ``stop`` when done."""
    thread = _LoopThread(f"launcher {Path(argv[0]).name}")
    try:
        launched = thread.run(launch(
            argv, ready, env=env, cwd=cwd, stderr=stderr, log_path=log_path,
            ready_timeout_s=ready_timeout_s, new_session=new_session,
        ))
    except BaseException:
        thread.close()
        raise
    return BlockingProcess(thread, launched)


# -- the child's half -------------------------------------------------------------------------


# Run by ``guarded`` as ``python -I -S -c GUARD PARENT_PID SIGNAL PROGRAM ARGS...``: set
# PR_SET_PDEATHSIG, make sure the parent did not die before it took effect, then become the
# program (execve keeps the setting, except for set-user-ID programs).
_GUARD = """\
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2]))
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
try:
    os.execvp(sys.argv[3], sys.argv[3:])
except OSError as exc:
    sys.stderr.write(f"cannot run {sys.argv[3]!r}: {exc.strerror}\\n")
    os._exit(127)
"""


def guarded(argv: Sequence[str], signum: int) -> tuple[str, ...]:
    """``argv`` run so that it gets ``signum`` when this process dies, for a program that
    cannot call ``die_with_parent`` itself: a short Python prelude (some 20 ms) that sets
    it and then executes the program in its place, same pid. Not done with ``preexec_fn``,
    which is unsafe in a process with threads. Linux only; elsewhere ``argv`` unchanged."""
    if sys.platform != "linux":
        return tuple(argv)
    return (sys.executable, "-I", "-S", "-c", _GUARD, str(os.getpid()), str(int(signum)),
            *argv)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send ``signum`` to this process when its parent dies, so a
    launcher killed outright (SIGKILL) leaves nothing behind. Elsewhere: nothing."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)
