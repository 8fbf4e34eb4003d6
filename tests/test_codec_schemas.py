"""The published JSON Schemas: committed = generated, they accept and refuse what the decoder
does, and the API serves them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from pydantic import SecretStr

from core import jsonschemas
from core.codec import CodecError, Command, Event, decode_command, decode_event
from core.settings import Settings
from service import schemas
from service.auth import Authenticator, bearer_check, protected
from service.errors import at_edge
from tests.test_codec import MALFORMED_EVENTS, _event

SCHEMAS = jsonschemas.generate()


def test_committed_schemas_equal_the_generated_ones(tmp_path: Path) -> None:
    assert jsonschemas.stale() == [], "run `python -m core.jsonschemas`"
    assert jsonschemas.main(["--check"]) == 0
    # The check sees drift: an edited, a missing and an extra file.
    jsonschemas.write(tmp_path)
    assert jsonschemas.stale(tmp_path) == []
    (tmp_path / "events.json").write_text("{}")
    (tmp_path / "command.run.json").unlink()
    (tmp_path / "old.json").write_text("{}")
    assert sorted(jsonschemas.stale(tmp_path)) == ["command.run.json", "events.json", "old.json"]
    assert jsonschemas.main(["--check", "--dir", str(tmp_path)]) == 1


def test_every_kind_has_a_schema() -> None:
    assert set(SCHEMAS) == {"events", "commands", "event.batch.state", "event.step.state",
                            "event.step.offsets", "command.run", "command.stop",
                            "command.delete", "command.deploy"}
    for schema in SCHEMAS.values():
        Draft202012Validator.check_schema(schema)


def _valid(name: str, raw: bytes) -> bool:
    return Draft202012Validator(SCHEMAS[name]).is_valid(json.loads(raw))


def _decodes(decode: Any, raw: bytes) -> bool:
    try:
        decode(raw)
    except CodecError:
        return False
    return True


GOOD_EVENTS = [
    Event("batch.state", "b", "p", state="running", flow_run_id="0b5c3a8e-6f1d-4c2a-9e57-3d1f2a4b5c6d").encode(),
    Event("batch.state", "b", "p", state="stop", outcome="failed", reason="x" * 2000).encode(),
    Event("step.state", "b", "p", step="load", state="success").encode(),
    Event("step.offsets", "b", "p", step="load", offsets={"p0": 0, "p1": 2**53 - 1}).encode(),
    _event(ts=3),  # an integer time is a number too
    _event(state="running").replace(b"}", b',"outcome":null,"reason":null}'),  # null is absent
    _event(unknown_field="ignored"),  # producers may add fields before the schema does
]
# A JSON Schema cannot say "at most a day ahead of now": those cases are the decoder's alone.
BAD_EVENTS = [raw for raw, reason in MALFORMED_EVENTS if reason != "ahead of now"] + [
    b"[1]", b'"text"', b"null"]


@pytest.mark.parametrize("raw", GOOD_EVENTS + BAD_EVENTS)
def test_schemas_and_decoder_agree_on_events(raw: bytes) -> None:
    decoded = _decodes(decode_event, raw)
    assert _valid("events", raw) is decoded
    kind = orjson.loads(raw).get("type") if raw.startswith(b"{") else None
    if decoded:
        assert _valid(f"event.{kind}", raw)
    assert decoded is (raw in GOOD_EVENTS)


GOOD_COMMANDS = [
    Command("run", "b", "p", "1").encode(),
    Command("stop", "b", "p").encode(),
    Command("delete", "b", "p").encode(),
    Command("deploy", "", "p", "2").encode(),
]


def _command(**changes: object) -> bytes:
    base = orjson.loads(Command("run", "batch-1", "pipe").encode())
    base.update(changes)
    return orjson.dumps({k: v for k, v in base.items() if v is not None})


BAD_COMMANDS = [
    _command(type="explode"), _command(schema=2), _command(batch_id=""),
    _command(pipeline_version=3), _command(pipeline_version="a/b"), _command(ts="now"),
    _command(event_id=None), _command(type="deploy", batch_id="", pipeline_version=""),
    _command(type="deploy", pipeline_version=None),
]


@pytest.mark.parametrize("raw", GOOD_COMMANDS + BAD_COMMANDS)
def test_schemas_and_decoder_agree_on_commands(raw: bytes) -> None:
    decoded = _decodes(decode_command, raw)
    assert _valid("commands", raw) is decoded
    if decoded:
        assert _valid(f"command.{orjson.loads(raw)['type']}", raw)
    assert decoded is (raw in GOOD_COMMANDS)


async def test_the_api_serves_the_schemas_without_a_token() -> None:
    """Behind the API's own edge (no engines needed)."""
    settings = Settings(api_tokens=[SecretStr("a-static-token-of-some-length")])
    check = bearer_check(Authenticator.from_settings(settings))
    app = web.Application()
    for path, handler in (("/api/v1/schemas", schemas.list_schemas),
                          ("/api/v1/schemas/{name}", schemas.get_schema),
                          ("/api/v1/batches/{pipeline_id}", schemas.list_schemas)):
        # As service.routes registers a route: its pattern decides whether a token is checked.
        app.router.add_get(path, at_edge(handler, "test", check if protected(path) else None))
    async with TestClient(TestServer(app)) as client:
        index = await client.get("/api/v1/schemas")
        assert index.status == 200
        items = (await index.json())["items"]
        assert set(items) == set(SCHEMAS)
        for name, item in items.items():
            assert item["title"] == SCHEMAS[name]["title"]
            got = await client.get(item["url"])
            assert got.status == 200 and got.content_type == "application/schema+json"
            assert await got.json() == SCHEMAS[name]
        for name in ("nope", "..%2Fsettings", "events.json"):
            missing = await client.get(f"/api/v1/schemas/{name}")
            assert missing.status == 404
            assert (await missing.json())["error"]["code"] == "not_found"
        # Only the schemas are public: the rest of /api/v1 still needs a token.
        assert (await client.get("/api/v1/batches/p")).status == 401
