"""``inference-router``: serve, check-config, config-reference, call, version.

Signals of ``serve`` (docs/operations.md#signals): SIGTERM, SIGINT and SIGQUIT drain (a second
one exits at once); SIGHUP reloads the config; SIGUSR1 logs the router's statistics; SIGUSR2
is logged and ignored; SIGPIPE is ignored (a write to a closed socket is an error on that
socket). Errors that stop the router from starting (a listen address in use, a backend process
that does not start) and a ``call`` that cannot reach the router are one line on stderr, with
exit status 2 and 1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop

from router.control import launcher
from router.core import config as config_mod
from router.core.errors import ConfigError, RouterError
from router.protocol import announce


def _backend_flag(value: str) -> dict[str, Any]:
    """HOST:PORT[:WEIGHT] -> a backends table entry."""
    parts = value.rsplit(":", 2)
    if len(parts) == 3 and parts[2].isdigit() and parts[1].isdigit():
        return {"address": f"{parts[0]}:{parts[1]}", "weight": int(parts[2])}
    return {"address": value}


# The instance ``serve --replicas N -- CMD`` runs: its replicas are backends main-0, main-1...
COMMAND_LINE_INSTANCE = "main"


def _replicas_flag(args: argparse.Namespace) -> dict[str, Any]:
    """--replicas N [--protocol P] [--model M]... -- CMD ARGS -> an instances table entry."""
    if not args.replica_command:
        raise ConfigError(["<command line>: --replicas needs the command after --, as in "
                           "--replicas 2 -- python -m backends.echo --port {port}"])
    return {"name": COMMAND_LINE_INSTANCE, "command": list(args.replica_command),
            "replicas": args.replicas, "protocol": args.protocol, "models": list(args.model)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inference-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the router")
    serve.add_argument("--config", type=Path, help="TOML config file")
    serve.add_argument("--listen", help="HOST:PORT for the length-prefixed protocol")
    serve.add_argument("--backend", action="append", default=[], metavar="HOST:PORT[:WEIGHT]",
                       help="a backend (repeatable); replaces the file's backends")
    serve.add_argument("--grpc-listen", metavar="HOST:PORT",
                       help="HOST:PORT for the gRPC front door (grpc.listen; off by default)")
    serve.add_argument("--admin", help="HOST:PORT for the admin HTTP API")
    serve.add_argument("--admin-token-file", metavar="FILE",
                       help="bearer token for the admin API (admin.token_file)")
    serve.add_argument("--queue-size", type=int)
    serve.add_argument("--shutdown-grace", type=float, metavar="SECONDS")
    serve.add_argument("--reuse-port", action="store_true", default=None,
                       help="SO_REUSEPORT: share the port with another router (rolling restart)")
    serve.add_argument("--processes", type=int, metavar="N",
                       help="router processes sharing the listen port (listener.processes)")
    serve.add_argument("--state-file", metavar="PATH",
                       help="persist the API's changes in this TOML file (state.file)")
    serve.add_argument("--access-log", metavar="FILE",
                       help='JSON lines, one per request, to FILE ("-": stdout) '
                            "(access_log.path; off by default)")
    serve.add_argument("--replicas", type=int, metavar="N",
                       help="run N replicas of the command after -- (placeholders such as "
                            "{port} substituted) behind the router; replaces the file's "
                            "[[instances]]")
    serve.add_argument("--protocol", choices=("frames", "grpc"), default="frames",
                       help="with --replicas: the protocol the replicas speak")
    serve.add_argument("--model", action="append", default=[], metavar="NAME[:VERSION]",
                       help="with --replicas: a model the replicas serve (repeatable)")
    serve.add_argument("replica_command", nargs="*", metavar="-- CMD ARGS",
                       help="with --replicas: the command of each replica")
    # Set by the supervisor for its children: announce "READY <admin port>" on stdout.
    serve.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path)
    reference = sub.add_parser("config-reference",
                               help="print the configuration reference (Markdown)")
    reference.add_argument("--output", type=Path, metavar="FILE",
                           help="write it to FILE instead of stdout")
    call = sub.add_parser("call", help="send one request and print the answer")
    call.add_argument("--to", default="127.0.0.1:7070", metavar="HOST:PORT")
    call.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up after this long (connect and answer)")
    call.add_argument("--tls-ca", metavar="PEM",
                      help="speak TLS, verifying the router's certificate against this CA")
    call.add_argument("--tls-server-name", metavar="NAME",
                      help="name the router's certificate must carry (default: the host)")
    call.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    call.add_argument("--tls-key", metavar="PEM", help="its key (default: in --tls-cert)")
    call.add_argument("payload")
    sub.add_parser("version",
                   help="print the version and the build (compiled or pure) as JSON")
    return parser


def _version() -> dict[str, object]:
    """The version and the build: ``compiled`` when the hot modules load from extension modules
    (router/core/build.py), with the modules that did; ``pure`` otherwise."""
    import router.app  # noqa: F401  (imports every module a serving router runs)
    from router.core import build

    return {"version": build.version(), "build": build.build(),
            "compiled_modules": build.compiled_modules()}


def build_config(args: argparse.Namespace) -> config_mod.RouterConfig:
    """File (or the embedded default), then flags on top; validated once."""
    if args.config is not None:
        base: dict[str, Any] = config_mod.read_toml(args.config)
        source = str(args.config)
    elif args.backend or args.replicas is not None:
        base, source = {}, "<command line>"
    else:
        base, source = config_mod.EMBEDDED_DEFAULT, "<embedded default>"
    overrides: dict[str, Any] = {}
    flag_keys = {
        ("listener", "listen"): args.listen,
        ("admin", "listen"): args.admin,
        ("admin", "token_file"): args.admin_token_file,
        ("grpc", "listen"): args.grpc_listen,
        ("dispatch", "queue_size"): args.queue_size,
        ("drain", "shutdown_grace_s"): args.shutdown_grace,
        ("listener", "reuse_port"): args.reuse_port,
        ("listener", "processes"): args.processes,
        ("state", "file"): args.state_file,
        ("access_log", "path"): args.access_log,
    }
    for (section, key), value in flag_keys.items():
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.backend:
        overrides["backends"] = [_backend_flag(b) for b in args.backend]
    if args.replicas is not None:
        overrides["instances"] = [_replicas_flag(args)]
    elif args.replica_command:
        raise ConfigError(["<command line>: a command after -- needs --replicas N"])
    if overrides and args.config is not None:
        # A bad value may come from a flag rather than the file: name both.
        source = f"{source} + command-line flags"
    return config_mod.from_mapping(config_mod.merge(base, overrides), source)


log = logging.getLogger("router")

# Until the loop's handlers are in place (while the config loads), these would end the
# process by default; ignored instead, and handled from then on.
_IGNORED_UNTIL_HANDLED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class Signals:
    """A serving process's signals. ``stop`` is set by the first SIGTERM, SIGINT or SIGQUIT
    (a drain); a second one calls ``force`` and exits with status 1 at once. SIGHUP asks
    ``run_reloads`` for a reload (several while one runs: one more after it). SIGUSR1 logs
    ``statistics()``; SIGUSR2 is logged and ignored."""

    def __init__(self, force: Callable[[], None],
                 statistics: Callable[[], object]) -> None:
        self.stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._force = force
        self._statistics = statistics
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(signum, self._on_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGUSR1, self._on_usr1)
        loop.add_signal_handler(signal.SIGUSR2, log.info, "SIGUSR2: ignored")

    def _on_stop(self, signum: int) -> None:
        if self.stop.is_set():
            log.warning("second signal: exiting now")
            self._force()
            os._exit(1)
        log.info("%s: draining", signal.Signals(signum).name)
        self.stop.set()

    def _on_hup(self) -> None:
        if self.stop.is_set():
            log.info("SIGHUP: ignored, draining")
            return
        log.info("SIGHUP: reloading the config")
        self._reload.set()

    def _on_usr1(self) -> None:
        log.info("statistics: %s", orjson.dumps(self._statistics()).decode())

    async def run_reloads(self, reload: Callable[[], Awaitable[object]]) -> None:
        """Run ``reload`` for each SIGHUP, one at a time, until cancelled."""
        while True:
            await self._reload.wait()
            self._reload.clear()
            await reload()


def _print_banner(listen: tuple[str, int], grpc: tuple[str, int] | None,
                  admin: tuple[str, int], extra: str, *,
                  admin_grpc: tuple[str, int] | None = None,
                  anyserve: tuple[str, int] | None = None) -> None:
    """What it listens on and how to try it (``announce.parse_banner`` reads it back)."""
    banner = announce.Banner(listen, admin, grpc, admin_grpc, anyserve)
    print(announce.format_banner(banner, extra), flush=True)


def _log_dir() -> Path:
    return Path(os.environ.get("ROUTER_LOG_DIR", ".router-logs"))


def _startup_failed(exc: RouterError) -> int:
    """A router that cannot start: one line (the error names what and why), exit 2."""
    print(f"inference-router: {exc.message}", file=sys.stderr)
    return 2


async def _serve(cfg: config_mod.RouterConfig, source: Callable[[], config_mod.RouterConfig],
                 supervised: bool = False) -> int:
    from router.app import RouterApp  # imported here: check-config needs no event loop parts

    try:
        app = RouterApp(cfg, log_dir=_log_dir(), source=source)  # loads the TLS files
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    signals = Signals(app.spawner.kill_now, app.statistics)
    try:
        try:
            bound = await app.start()
        except RouterError as exc:  # ListenFailed, SpawnError: fault "config"
            return _startup_failed(exc)
        _tune_gc()
        if supervised:
            # SIGTERM (a drain) when the supervisor dies, so a supervisor that is killed
            # outright leaves no router process behind.
            launcher.die_with_parent(signal.SIGTERM)
            print(announce.format_ready(bound.admin[1]), flush=True)
        backends = ", ".join(b.address for b in app.registry)
        _print_banner(bound.listen, bound.grpc, bound.admin, f"backends: {backends}",
                      admin_grpc=bound.admin_grpc, anyserve=bound.anyserve)
        async with asyncio.TaskGroup() as group:
            reloads = group.create_task(signals.run_reloads(app.reload), name="reloads")
            report = await app.serve(signals.stop.wait())
            reloads.cancel()
    finally:
        await app.close()
    return 0 if report.dropped == 0 else 1


# Collections of the youngest generation, in allocations: 10x the interpreter's default.
GC_GEN0_THRESHOLD = 7000


def _tune_gc() -> None:
    """Keep the cycle collector off the hot path once the router is up.

    Measured with gc.callbacks over 500,000 requests from 10,000 clients: the collector took
    9 % of the router's CPU with the defaults, 0.8 % after ``gc.freeze()`` (startup objects
    are never traversed again) and a 10x gen0 threshold. Requests make little cyclic
    garbage, so collecting less often holds little memory back.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def _supervise(cfg: config_mod.RouterConfig,
                     source: Callable[[], config_mod.RouterConfig]) -> int:
    from router.control.supervisor import Supervisor

    try:
        supervisor = Supervisor(cfg, _log_dir(), source=source)  # loads the admin TLS files
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    signals = Signals(supervisor.force_exit, supervisor.statistics)
    try:
        try:
            bound = await supervisor.start()
        except RouterError as exc:
            return _startup_failed(exc)
        count = cfg.listener.processes
        _print_banner(bound.listen, bound.grpc, bound.admin,
                      f"processes: {count} sharing the port (SO_REUSEPORT)")
        async with asyncio.TaskGroup() as group:
            reloads = group.create_task(signals.run_reloads(supervisor.reload), name="reloads")
            code = await supervisor.serve(signals.stop.wait())
            reloads.cancel()
        return code
    finally:
        await supervisor.close()


def _client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_ca is None:
        return None
    ctx = ssl.create_default_context(cafile=args.tls_ca)
    if args.tls_cert is not None:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    return ctx


async def _call(address: str, payload: str, timeout_s: float, tls: ssl.SSLContext | None = None,
                server_name: str | None = None) -> int:
    """One request; every failure is one line on stderr and exit status 1."""
    from router.client.frames import ConnectionLost, ErrorReply, FrameClient

    try:
        host, port = config_mod.parse_host_port(address)
    except ValueError as exc:
        print(f"inference-router: --to: {exc}", file=sys.stderr)
        return 2
    try:
        async with asyncio.timeout(timeout_s):
            client = await FrameClient.connect(host, port, ssl=tls, server_hostname=server_name)
            try:
                answer = await client.request(payload.encode())
            finally:
                await client.close()
    except ErrorReply as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ConnectionLost, TimeoutError) as exc:
        cause = (f"no answer within {timeout_s}s" if isinstance(exc, TimeoutError)
                 else getattr(exc, "strerror", None) or str(exc))
        print(f"inference-router: cannot reach the router at {address}: {cause}",
              file=sys.stderr)
        return 1
    sys.stdout.buffer.write(answer + b"\n")
    return 0


def _check_files(cfg: config_mod.RouterConfig) -> None:
    """The files a valid config names must load too: certificates, keys, CAs, the token."""
    from router.control.admin import read_token
    from router.tls.context import check_files

    problems = check_files(cfg)
    if cfg.admin.token_file is not None:
        try:
            read_token(cfg.admin.token_file)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        try:
            _check_files(config_mod.load(args.file))
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            sys.exit(2)
        print(f"{args.file}: ok")
        return
    if args.command == "config-reference":
        from router.core.config_reference import render

        if args.output is None:
            sys.stdout.write(render())
        else:
            args.output.write_text(render())
        return
    if args.command == "version":
        print(orjson.dumps(_version()).decode())
        return
    if args.command == "call":
        sys.exit(uvloop.run(_call(args.to, args.payload, args.timeout, _client_tls(args),
                                  args.tls_server_name)))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for signum in _IGNORED_UNTIL_HANDLED:
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        sys.exit(2)
    def source() -> config_mod.RouterConfig:
        return build_config(args)  # a reload reads the same file, with the same flags on top

    if cfg.listener.processes > 1 and not args.supervised:
        sys.exit(uvloop.run(_supervise(cfg, source)))
    sys.exit(uvloop.run(_serve(cfg, source, supervised=args.supervised)))
