"""Bearer authentication: static tokens (all scopes) and JWTs (HS256 / RS256) with scopes.

A JWT must carry `exp`, and `aud` and `iss` equal to DHUB_JWT_AUDIENCE / DHUB_JWT_ISSUER: a
token minted for another service, by another issuer, or valid forever is refused. The API
does not start with JWTs enabled but no audience or issuer, nor on insecure settings outside
the local stack (`Settings.check_secure`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import jwt
from aiohttp import web
from jwt.algorithms import RSAAlgorithm

from core.settings import InsecureSettings, Settings
from service.errors import ApiError

READ: Final = "batches:read"
WRITE: Final = "batches:write"
PIPELINES_WRITE: Final = "pipelines:write"
METRICS_READ: Final = "metrics:read"
ALL_SCOPES: Final = frozenset({READ, WRITE, PIPELINES_WRITE, METRICS_READ})

# Routes outside /api/v1 (health, docs) and the signed webhook authenticate differently.
PROTECTED_PREFIX: Final = "/api/v1/"
# Outside /api/v1 but behind a token all the same.
PROTECTED_PATHS: Final = frozenset({"/metrics"})
PUBLIC_PATHS: Final = frozenset({"/api/v1/openapi.json", "/api/v1/hooks/prefect",
                                 "/api/v1/schemas"})
# The messages' JSON Schemas describe the wire format, like the OpenAPI document.
PUBLIC_PREFIXES: Final = ("/api/v1/schemas/",)
# When the request's token stops being valid (a JWT's `exp`, unix seconds); absent for a
# static token, valid until it is removed from the settings.
EXPIRES_KEY: Final = web.RequestKey("token_expires", float)
REQUIRED_CLAIMS: Final = ("exp", "aud", "iss")


class AuthConfigError(InsecureSettings):
    """JWTs are enabled without what a token is checked against."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token allows, and until when (None: a static token)."""

    scopes: frozenset[str]
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class Authenticator:
    # Secrets: never in a repr (a log line or a traceback that shows the object).
    static_tokens: tuple[bytes, ...] = field(repr=False)
    hs256_secret: str | None = field(repr=False)
    rs256_public_key: str | None
    audience: str | None
    issuer: str | None
    # Each static token -> its grant (one object, shared by every request). A dict finds a
    # token by its hash, keyed per process (PYTHONHASHSEED): a wrong token is compared with
    # a known one only on a full 64-bit hash collision, so the time a lookup takes says
    # nothing about how close a guess came; and it costs no more with many tokens.
    _static: dict[str, Grant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        grant = Grant(ALL_SCOPES)
        object.__setattr__(self, "_static", {t.decode(): grant for t in self.static_tokens})

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Raises `InsecureSettings` (or its `AuthConfigError`) when the API must not start."""
        settings.check_secure()
        if settings.jwt_enabled and not (settings.jwt_audience and settings.jwt_issuer):
            raise AuthConfigError(
                "JWTs are enabled (DHUB_JWT_HS256_SECRET or DHUB_JWT_RS256_PUBLIC_KEY) but "
                "DHUB_JWT_AUDIENCE and DHUB_JWT_ISSUER are not both set: every token must "
                "name this API as its audience and a trusted issuer")
        if settings.jwt_rs256_public_key:
            # Parsed now, not at the first token: a key the API cannot read otherwise
            # started it, and then every RS256 token was answered 401 "invalid token",
            # blaming each client for the server's setting. The value is never quoted.
            try:
                RSAAlgorithm(RSAAlgorithm.SHA256).prepare_key(settings.jwt_rs256_public_key)
            except (jwt.PyJWTError, ValueError, TypeError):
                raise AuthConfigError(
                    "DHUB_JWT_RS256_PUBLIC_KEY is not a readable RSA public key: give the "
                    "PEM text itself (-----BEGIN PUBLIC KEY----- ...) with real newlines, "
                    "not \\n escapes") from None
        return cls(
            static_tokens=tuple(t.encode() for t in settings.static_tokens()),
            hs256_secret=(settings.jwt_hs256_secret.get_secret_value()
                          if settings.jwt_hs256_secret else None),
            rs256_public_key=settings.jwt_rs256_public_key,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )

    def grant(self, token: str) -> Grant:
        """The token's scopes and expiry; raises 401 when the token is not valid."""
        static = self._static.get(token)
        if static is not None:
            return static
        if token.count(".") == 2 and (self.hs256_secret or self.rs256_public_key):
            return self._jwt_grant(token)
        raise ApiError(401, "unauthorized", "invalid bearer token")

    def _jwt_grant(self, token: str) -> Grant:
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg == "HS256" and self.hs256_secret:
                key = self.hs256_secret
            elif alg == "RS256" and self.rs256_public_key:
                key = self.rs256_public_key
            else:
                raise ApiError(401, "unauthorized", "unsupported token algorithm")
            # from_settings guarantees both when a key is set.
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience,
                                issuer=self.issuer, options={"require": list(REQUIRED_CLAIMS)})
        except jwt.PyJWTError as exc:
            raise ApiError(401, "unauthorized", f"invalid token: {exc}") from None
        raw = claims.get("scope", claims.get("scopes", ""))
        scopes = raw.split() if isinstance(raw, str) else raw
        if not isinstance(scopes, list):
            raise ApiError(401, "unauthorized", "invalid scope claim")
        # `exp` is required, and PyJWT has checked it is an integer in the future; one no
        # float holds (10**400) would raise where a stream's cut reads it.
        try:
            expires = float(claims["exp"])
        except (OverflowError, ValueError, TypeError):
            raise ApiError(401, "unauthorized", "invalid token: exp out of range") from None
        return Grant(frozenset(s for s in scopes if isinstance(s, str)), expires)


def protected(path: str) -> bool:
    """Whether a request for `path` needs a bearer token. A route's pattern answers for every
    path it matches: no route has a variable part before the part of its path that decides
    (tests/test_api_auth.py checks each route)."""
    return ((path.startswith(PROTECTED_PREFIX) and path not in PUBLIC_PATHS
             and not path.startswith(PUBLIC_PREFIXES)) or path in PROTECTED_PATHS)


def bearer_check(authenticator: Authenticator,
                 scope: str | None = None) -> Callable[[web.Request], None]:
    """What the edge (service.errors) runs before the handler of a protected route: a valid
    bearer token (401), holding the route's `scope` (403; service.routes names each route's)."""
    def check(request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        if not header.isascii():
            # Bytes that are not UTF-8 arrive as surrogates and break any encode() later.
            raise ApiError(401, "unauthorized", "the Authorization header must be ASCII")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "missing bearer token")
        grant = authenticator.grant(token)
        if scope is not None and scope not in grant.scopes:
            raise ApiError(403, "forbidden", f"this token lacks the scope {scope}")
        if grant.expires is not None:
            request[EXPIRES_KEY] = grant.expires

    return check


def authentication(authenticator: Authenticator) -> Callable[[web.Request], None]:
    """The check for a request whose route is not known in advance (service.routes'
    catch-all): the bearer check where the path is `protected`."""
    check = bearer_check(authenticator)

    def authenticate(request: web.Request) -> None:
        if protected(request.path):
            check(request)

    return authenticate


def until_expiry(request: web.Request) -> asyncio.Timeout:
    """Bounds a push stream by its token's life: a token is checked once, when the stream
    opens, and a stream can stay open for hours (a pipeline's for ever), so an expired token
    would go on reading every change. Raises TimeoutError at `exp`; the stream is then cut
    (not ended: nothing happened to the batch) and the client's reconnect needs a valid
    token."""
    expires = request.get(EXPIRES_KEY)
    return asyncio.timeout(None if expires is None else max(expires - time.time(), 0.0))
