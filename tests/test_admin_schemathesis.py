"""Schemathesis against a running router's admin API: it reads the router's own
``/openapi.json``, sends generated requests (valid and invalid, bounded) to every declared
operation, and requires that no answer is a 500 and that every answer matches the schema,
status and media type its operation declares."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

from router.control.admin_routes import ALL_ROUTES
from tests.conftest import EchoBackend, RouterFactory

TOKEN = "schemathesis-token"
# The whole run stays a few seconds: 20 examples per operation and phase, 60 s at most.
MAX_EXAMPLES = 20
RUN_TIMEOUT_S = 60.0


async def test_no_generated_request_gets_a_500_or_an_undeclared_answer(
    echo_backend: Callable[..., EchoBackend], router_factory: RouterFactory, tmp_path: Path
) -> None:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    router = await router_factory([echo_backend().address],
                                  {"admin": {"token_file": str(token)},
                                   # Generated registrations must not send probes off loopback.
                                   "registry": {"allowed_networks": ["127.0.0.0/8"],
                                                "allow_unix": False}})
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{router.admin_url}/openapi.json",
        "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
        "content_type_conformance",
        "--max-examples", str(MAX_EXAMPLES), "--seed", "12", "--workers", "1",
        "--generation-database", "none", "--no-color",
        "--header", f"Authorization: Bearer {TOKEN}",
        # Reloading the config the test router was started from is test_reload's subject;
        # here the operation would only reload the same file over and over.
        "--exclude-operation-id", "reload",
        "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"),
    ]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    text = output.decode()
    assert process.returncode == 0, text
    cases = ElementTree.parse(tmp_path / "junit.xml").getroot().iter("testcase")
    tested = {str(case.get("name")) for case in cases}
    # Every declared operation ran, but reload (excluded above) and /openapi.json, which
    # schemathesis leaves out as the document it was given.
    assert tested >= {f"{r.method} {r.path}" for r in ALL_ROUTES if r.name not in {"reload",
                                                                               "openapi"}}
    assert "failures=\"0\"" in (tmp_path / "junit.xml").read_text()
