"""The edge and the operator's tools telling the truth: what /metrics counts, what settings the
API starts on, how a misconfigured key is reported, and what `dhub` makes of an error body
that is not the API's own (a proxy's)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from core.settings import Settings
from service.auth import AuthConfigError, Authenticator
from tests.cache_support import engines
from tests.helpers import RSA_PUBLIC, api_settings


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    yield from engines("redis", "kafka")


# -- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize(("variable", "value"), [
    # SET ... EX 0 fails: every POST's Idempotency-Key stays `pending` (an error logged) and
    # frees after 60 s, so a retry then runs a second batch.
    ("DHUB_IDEMPOTENCY_TTL_S", "0"),
    ("DHUB_IDEMPOTENCY_TTL_S", "-60"),
    # ZREMRANGEBYRANK seen 0 -1: every event id forgotten at once (no de-duplication).
    ("DHUB_DEDUP_WINDOW", "0"),
    # aiohttp reads a limit of 0 as none at all: any body accepted, however large.
    ("DHUB_MAX_BODY_BYTES", "0"),
])
def test_a_setting_out_of_its_range_is_refused_at_start_naming_it(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert variable.removeprefix("DHUB_").lower() in str(info.value)


def test_an_unreadable_rs256_public_key_is_refused_at_start(test_settings: Settings) -> None:
    """A key the API cannot parse (here as an env file often carries it: `\\n` escapes for
    the newlines) started the API; then every RS256 token was answered 401 "invalid token:
    Could not parse the provided public key", blaming each client's token for the server's
    setting. Now the API does not start, and says which variable is wrong (not its value)."""
    escaped = RSA_PUBLIC.replace("\n", "\\n")
    for key in (escaped, "not a key"):
        settings = api_settings(test_settings, jwt_rs256_public_key=key)
        with pytest.raises(AuthConfigError) as info:
            Authenticator.from_settings(settings)
        assert "DHUB_JWT_RS256_PUBLIC_KEY" in str(info.value)
        assert key not in str(info.value)
    # A good key still starts.
    Authenticator.from_settings(api_settings(test_settings, jwt_rs256_public_key=RSA_PUBLIC))
