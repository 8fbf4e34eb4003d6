"""Bearer authentication: static tokens (all scopes) and JWTs (HS256 / RS256) with scopes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler

from core.settings import Settings
from service.errors import ApiError

READ: Final = "batches:read"
WRITE: Final = "batches:write"
PIPELINES_WRITE: Final = "pipelines:write"
ALL_SCOPES: Final = frozenset({READ, WRITE, PIPELINES_WRITE})

# Routes outside /api/v1 (health, docs) and the signed webhook authenticate differently.
PROTECTED_PREFIX: Final = "/api/v1/"
PUBLIC_PATHS: Final = frozenset({"/api/v1/openapi.json", "/api/v1/hooks/prefect",
                                 "/api/v1/schemas"})
# The messages' JSON Schemas describe the wire format, like the OpenAPI document.
PUBLIC_PREFIXES: Final = ("/api/v1/schemas/",)
SCOPE_KEY: Final = web.RequestKey("scopes", frozenset[str])


@dataclass(frozen=True, slots=True)
class Authenticator:
    static_tokens: tuple[bytes, ...]
    hs256_secret: str | None
    rs256_public_key: str | None
    audience: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        return cls(
            static_tokens=tuple(t.encode() for t in settings.static_tokens()),
            hs256_secret=(settings.jwt_hs256_secret.get_secret_value()
                          if settings.jwt_hs256_secret else None),
            rs256_public_key=settings.jwt_rs256_public_key,
            audience=settings.jwt_audience,
        )

    def scopes(self, token: str) -> frozenset[str]:
        """The token's scopes; raises 401 when the token is not valid."""
        candidate = token.encode()
        # Compare against every token so timing does not reveal which one nearly matched.
        matched = False
        for known in self.static_tokens:
            matched |= hmac.compare_digest(candidate, known)
        if matched:
            return ALL_SCOPES
        if token.count(".") == 2 and (self.hs256_secret or self.rs256_public_key):
            return self._jwt_scopes(token)
        raise ApiError(401, "unauthorized", "invalid bearer token")

    def _jwt_scopes(self, token: str) -> frozenset[str]:
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg == "HS256" and self.hs256_secret:
                key = self.hs256_secret
            elif alg == "RS256" and self.rs256_public_key:
                key = self.rs256_public_key
            else:
                raise ApiError(401, "unauthorized", "unsupported token algorithm")
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience,
                                options={"verify_aud": self.audience is not None})
        except jwt.PyJWTError as exc:
            raise ApiError(401, "unauthorized", f"invalid token: {exc}") from None
        raw = claims.get("scope", claims.get("scopes", ""))
        scopes = raw.split() if isinstance(raw, str) else raw
        if not isinstance(scopes, list):
            raise ApiError(401, "unauthorized", "invalid scope claim")
        return frozenset(s for s in scopes if isinstance(s, str))


def auth_middleware(authenticator: Authenticator) -> web.middleware:  # type: ignore[valid-type]
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if (not path.startswith(PROTECTED_PREFIX) or path in PUBLIC_PATHS
                or path.startswith(PUBLIC_PREFIXES)):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing bearer token")
        request[SCOPE_KEY] = authenticator.scopes(token.strip())
        return await handler(request)

    return middleware


def require(request: web.Request, scope: str) -> None:
    if scope not in request.get(SCOPE_KEY, frozenset()):
        raise ApiError(403, "forbidden", f"this token lacks the scope {scope}")
