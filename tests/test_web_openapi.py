"""The REST API against its own OpenAPI document: schemathesis generates requests from
``/api/v1/openapi.json`` and checks every answer (status code, content type, body
schema, no server error) against a running agent (`edge run` polling a pymodbus
server, a real mosquitto), with a bearer token so that the change routes are
exercised too."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from support import (
    Image,
    ModbusServer,
    device_docs,
    free_port,
    start_broker,
    wait_port,
    write_agent_file,
)

from edge.web.auth import new_token
from edge.web.openapi import openapi

TOKEN, TOKEN_HASH = new_token()
PROPS = [{"name": "level", "type": "INT", "collectCycle": 200,
          "visitor": {"register": "HoldingRegister", "offset": 0, "dataType": "int16"}}]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("openapi")
    broker = start_broker(tmp)
    server = ModbusServer({1: Image(hr=[42])})
    path = write_agent_file(tmp, broker.port, device_docs("tank", server.port, 1, PROPS))
    agent: dict[str, Any] = yaml.safe_load(path.read_text())
    web = free_port()
    agent["web"] = {"listen": f"127.0.0.1:{web}", "tokens": [TOKEN_HASH]}
    agent["policy"] = {"pin_dir": str(tmp / "bpffs" / "edge")}  # not the machine's pin
    path.write_text(yaml.safe_dump(agent))
    log = (tmp / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", str(path)], cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(web)
        yield f"http://127.0.0.1:{web}"
    finally:
        proc.terminate()
        proc.wait(10)
        server.stop()
        broker.stop()
    assert "Traceback" not in Path(tmp / "agent.log").read_text()


schema = schemathesis.openapi.from_dict(openapi())


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_openapi_document(case: Any, base_url: str) -> None:
    # a valid token on every request: schemathesis's own "invalid auth" cases would be
    # accepted for it, so that one check is left out (tests/test_web_auth.py covers it)
    case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"},
                           excluded_checks=[schemathesis.checks.ignored_auth])
