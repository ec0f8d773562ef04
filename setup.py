"""Build hook: with ROUTER_COMPILE=1, mypyc compiles the modules of COMPILED into C extensions."""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "router/core/clock.py",
    "router/core/errors.py",
    "router/protocol/frames.py",
    "router/protocol/session.py",
    "router/protocol/h2frames.py",
    "router/protocol/h2headers.py",
    "router/protocol/h2connection.py",
    "router/balance/policies.py",
    "router/upstream/frame_connection.py",
    "router/upstream/pool.py",
    "router/upstream/h2_backend.py",
    "router/dispatch/request.py",
    "router/dispatch/queue.py",
    "router/dispatch/backends.py",
    "router/dispatch/scheduler.py",
    "router/frontdoor/tcp/server.py",
    "router/frontdoor/grpc/relay.py",
    "router/frontdoor/grpc/relay_call.py",
]

ext_modules = []
if os.environ.get("ROUTER_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3", group_name="router.compiled")

setup(ext_modules=ext_modules)
