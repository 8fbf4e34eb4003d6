"""Bearer auth: static tokens and JWTs (HS256, RS256) with scopes; a JWT must carry `exp`,
the configured `aud` and `iss`; no header value gets a 500."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from core.settings import LOCAL_JWT_AUDIENCE, LOCAL_JWT_ISSUER, Settings
from service.app import init_app
from service.auth import AuthConfigError, Authenticator
from tests.helpers import AUTH, HS_SECRET, RSA_PRIVATE, api_client, api_settings, bearer, spec_body

Client = TestClient[Any, Any]


def claims(*scopes: str, ttl: float = 300, **changes: Any) -> dict[str, Any]:
    """Valid claims for the test API (the local stack's audience and issuer); a change of
    None removes that claim."""
    out: dict[str, Any] = {"sub": "tester", "scope": " ".join(scopes),
                           "exp": int(time.time() + ttl), "aud": LOCAL_JWT_AUDIENCE,
                           "iss": LOCAL_JWT_ISSUER, **changes}
    return {k: v for k, v in out.items() if v is not None}


def hs_token(*scopes: str, ttl: float = 300, **changes: Any) -> str:
    return jwt.encode(claims(*scopes, ttl=ttl, **changes), HS_SECRET, algorithm="HS256")


def rs_token(*scopes: str, ttl: float = 300, **changes: Any) -> str:
    payload = claims(ttl=ttl, scope=None, scopes=list(scopes), **changes)
    return jwt.encode(payload, RSA_PRIVATE, algorithm="RS256")


@pytest.fixture
async def api(topics: Settings, redis: Redis) -> AsyncIterator[Client]:
    async with api_client(api_settings(topics)) as client:
        assert (await client.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)).status == 201
        yield client


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"},
    {"Authorization": "Bearer wrong-token"}, bearer(hs_token("batches:read", ttl=-60)),
    bearer(jwt.encode({"scope": "batches:read"}, "another-secret-of-enough-length-0123456789",
                      algorithm="HS256")),
    bearer(jwt.encode({"scope": "batches:read"}, "", algorithm="none")),
    bearer(jwt.encode(claims("batches:read"), "", algorithm="none")),
    # The claims that make a token this API's and not forever:
    bearer(hs_token("batches:read", exp=None)),
    bearer(rs_token("batches:read", exp=None)),
    bearer(hs_token("batches:read", aud=None)),
    bearer(hs_token("batches:read", aud="another-service")),
    bearer(rs_token("batches:read", aud="another-service")),
    bearer(hs_token("batches:read", iss=None)),
    bearer(hs_token("batches:read", iss="someone-else")),
    bearer(rs_token("batches:read", iss="someone-else")),
], ids=["none", "empty-bearer", "basic", "wrong-static", "expired", "other-secret",
        "alg-none", "alg-none-full", "hs-no-exp", "rs-no-exp", "no-aud", "hs-other-aud",
        "rs-other-aud", "no-iss", "hs-other-iss", "rs-other-iss"])
async def test_without_a_valid_token_401(api: Client, headers: dict[str, str]) -> None:
    response = await api.get("/api/v1/batches/p/", headers=headers)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("make", [hs_token, rs_token])
async def test_jwt_scopes(api: Client, make: Any) -> None:
    reader = bearer(make("batches:read"))
    writer = bearer(make("batches:read", "batches:write"))
    admin = bearer(make("pipelines:write"))
    assert (await api.get("/api/v1/batches/p/", headers=reader)).status == 200
    assert (await api.get("/api/v1/pipelines/p", headers=reader)).status == 200
    denied = await api.post("/api/v1/batches/p", headers=reader)
    assert denied.status == 403 and (await denied.json())["error"]["code"] == "forbidden"
    created = await api.post("/api/v1/batches/p", headers=writer)
    assert created.status == 200
    batch_id = (await created.json())["item"]
    assert (await api.put(f"/api/v1/batches/p/{batch_id}/stop", headers=reader)).status == 403
    assert (await api.delete(f"/api/v1/batches/p/{batch_id}", headers=reader)).status == 403
    assert (await api.put(f"/api/v1/batches/p/{batch_id}/stop", headers=writer)).status == 200
    body = spec_body(version="2")
    assert (await api.put("/api/v1/pipelines/p", json=body, headers=writer)).status == 403
    assert (await api.put("/api/v1/pipelines/p", json=body, headers=admin)).status == 201
    assert (await api.get("/api/v1/batches/p/", headers=admin)).status == 403


async def test_several_static_tokens(topics: Settings, redis: Redis,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    settings = api_settings(topics)
    monkeypatch.setenv("DHUB_API_TOKENS", "one-token,two-token")  # the form a deployment sets
    settings = settings.model_copy(update={"api_tokens": Settings().api_tokens})
    async with api_client(settings) as api:
        for token in ("one-token", "two-token"):
            assert (await api.get("/api/v1/pipelines/", headers=bearer(token))).status == 200
        assert (await api.get("/api/v1/pipelines/", headers=bearer("three-token"))).status == 401


async def test_health_and_docs_need_no_token(api: Client) -> None:
    assert (await api.get("/healthz")).status == 200
    ready = await api.get("/readyz")
    checks = (await ready.json())["checks"]
    assert ready.status == 200 and (checks["redis"], checks["kafka"]) == (True, True)
    assert all(checks["topics"].values()) and len(checks["topics"]) == 3
    assert (await api.get("/api/v1/openapi.json")).status == 200
    assert (await api.get("/docs")).status == 200


@pytest.mark.parametrize("value", [
    b"Bearer \x80abc", b"Bearer a.\xff\xfe.c", b"Bearer \xc3\xa9t\xc3\xa9",
    b"Bearer \xc3\xa9.e.e", b"B\xc3\xa9arer abc",
])
async def test_a_non_ascii_authorization_header_is_a_401_json(api: Client, value: bytes) -> None:
    # Raw bytes on the socket: an HTTP client would refuse to send most of these.
    server = api.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(b"GET /api/v1/batches/p/ HTTP/1.1\r\nHost: test\r\n"
                     b"Connection: close\r\nAuthorization: " + value + b"\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 401 Unauthorized", raw
    assert b"application/json" in head
    assert b'"code":"unauthorized"' in body and b"ASCII" in body


@pytest.mark.parametrize("missing", [{"jwt_audience": None}, {"jwt_issuer": None},
                                     {"jwt_audience": "", "jwt_issuer": ""}])
def test_the_api_refuses_to_start_with_jwts_but_no_audience_or_issuer(
        missing: dict[str, Any]) -> None:
    hs = api_settings(Settings()).model_copy(update=missing)
    with pytest.raises(AuthConfigError, match="DHUB_JWT_AUDIENCE and DHUB_JWT_ISSUER"):
        Authenticator.from_settings(hs)
    with pytest.raises(AuthConfigError):
        init_app(hs)
    rs_only = hs.model_copy(update={"jwt_hs256_secret": None})
    with pytest.raises(AuthConfigError):
        Authenticator.from_settings(rs_only)
    # Without JWTs (static tokens only) nothing is needed.
    static_only = rs_only.model_copy(update={"jwt_rs256_public_key": None})
    assert Authenticator.from_settings(static_only).static_tokens


async def test_tokens_are_checked_against_the_configured_audience_and_issuer(
        topics: Settings, redis: Redis) -> None:
    settings = api_settings(topics, jwt_audience="batches.example", jwt_issuer="idp.example")
    async with api_client(settings) as api:
        # A registered pipeline: an unknown one's list is a 404 once authenticated.
        assert (await api.put("/api/v1/pipelines/p", json=spec_body(), headers=AUTH)).status == 201
        ours = bearer(hs_token("batches:read", aud="batches.example", iss="idp.example"))
        assert (await api.get("/api/v1/batches/p/", headers=ours)).status == 200
        # A token may list several audiences; one of them must be ours.
        several = bearer(rs_token("batches:read", aud=["other", "batches.example"],
                                  iss="idp.example"))
        assert (await api.get("/api/v1/batches/p/", headers=several)).status == 200
        cases: tuple[tuple[dict[str, Any], str], ...] = (({"iss": "idp.example"}, "audience"),
                                                         ({"aud": "batches.example"}, "issuer"))
        for changes, why in cases:
            local = bearer(hs_token("batches:read", **changes))  # the rest: local stack's
            refused = await api.get("/api/v1/batches/p/", headers=local)
            assert refused.status == 401
            assert why in (await refused.json())["error"]["message"].lower()


def _fillers() -> set[str]:
    """Every segment of the paths that decide whether a token is needed, and a plain one."""
    from service.auth import PROTECTED_PATHS, PROTECTED_PREFIX, PUBLIC_PATHS, PUBLIC_PREFIXES

    paths = (PROTECTED_PREFIX, *PROTECTED_PATHS, *PUBLIC_PATHS, *PUBLIC_PREFIXES)
    return {segment for path in paths for segment in path.split("/") if segment} | {"x"}


@pytest.mark.parametrize("filler", sorted(_fillers()))
def test_each_routes_pattern_says_whether_its_every_path_needs_a_token(filler: str) -> None:
    """The edge decides once per route, from its pattern, whether a token is checked
    (service.routes): any path the route matches must need a token exactly when the
    pattern does, whatever segment fills its variable parts (a route like
    /api/{version}/batches/{id} would fail here on `v1`)."""
    import re

    from service.auth import protected
    from service.routes import ROUTES

    for _, pattern, _, name, _ in ROUTES:
        path = re.sub(r"\{[^}]+\}", filler, pattern)
        assert protected(path) is protected(pattern), (name, path)


def test_a_route_names_a_scope_exactly_when_it_needs_a_token_and_the_document_says_the_same(
        ) -> None:
    """The edge checks the scope the route table names (service.routes); the OpenAPI
    document, written apart, must promise that same scope."""
    from service.auth import protected
    from service.openapi import build
    from service.routes import ROUTES

    paths = build()["paths"]
    for method, pattern, _, name, scope in ROUTES:
        assert (scope is not None) is protected(pattern), name
        security = paths[pattern][method.lower()].get("security")
        assert security == ([{"bearer": [scope]}] if scope is not None else None), name


async def test_each_route_refuses_a_token_without_its_scope_and_takes_one_with_it(
        api: Client) -> None:
    """403 before the handler runs, from the route's scope alone; a token holding it passes
    the edge (whatever the handler then answers)."""
    from service.auth import ALL_SCOPES
    from service.routes import ROUTES

    for method, pattern, _, name, scope in ROUTES:
        if scope is None:
            continue
        path = pattern.replace("{pipeline_id}", "p-scope").replace("{batch_id}", "batch-none")
        others = sorted(ALL_SCOPES - {scope})
        response = await api.request(method, path, headers=bearer(hs_token(*others)))
        assert response.status == 403, (name, response.status)
        assert (await response.json())["error"]["message"] == f"this token lacks the scope {scope}"
        response = await api.request(method, path, headers=bearer(hs_token(scope)))
        assert response.status not in (401, 403), (name, response.status)


async def test_an_unmatched_path_under_the_api_needs_a_token_before_it_is_a_404(
        api: Client) -> None:
    """Paths no route matches are answered by the catch-all route: under /api/v1 without a
    token that is a 401 (nothing about which paths exist), with one a 404 or a 405, all in
    the JSON shape; a percent-encoded newline in the path changes none of it."""
    async def error(response: Any, status: int) -> str:
        assert response.status == status, await response.text()
        assert response.headers["X-Request-Id"]
        return str((await response.json())["error"]["code"])

    for path in ("/api/v1/nothing-here/at/all", "/api/v1/a%0Ab"):
        assert await error(await api.get(path), 401) == "unauthorized"
        assert await error(await api.get(path, headers=AUTH), 404) == "not_found"
    for path in ("/api/v1/steps", "/api/v1/batches/p%0A"):
        assert await error(await api.put(path), 401) == "unauthorized"
        refused = await api.put(path, headers=AUTH)
        assert await error(refused, 405) == "method_not_allowed"
        assert "GET" in refused.headers["Allow"]
    assert await error(await api.get("/not-the-api%0A"), 404) == "not_found"


def test_the_authenticators_repr_shows_no_secret() -> None:
    authenticator = Authenticator(static_tokens=(b"a-static-token-of-some-length",),
                                  hs256_secret="an-hs256-secret-of-some-length",
                                  rs256_public_key=None, audience="aud", issuer="iss")
    shown = repr(authenticator)
    assert "a-static-token" not in shown and "an-hs256-secret" not in shown
    assert "aud" in shown  # the rest is still there to read
