"""Outside the local stack (DHUB_ENV other than `local`) default and short secrets are refused,
by the settings themselves (so the consumers refuse too) and again by the API's startup."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from core.settings import (
    DEFAULT_TOKEN_SECRET,
    LOCAL_JWT_AUDIENCE,
    LOCAL_JWT_ISSUER,
    InsecureSettings,
    Settings,
)
from service.auth import Authenticator

SECURE: dict[str, Any] = {
    "env": "production",
    "token_secret": "a-paging-secret-of-32-bytes-0123",
    "webhook_secret": "a-webhook-secret-0123",
    "api_tokens": "a-static-token-0123456789",
    "jwt_hs256_secret": "an-hs256-secret-of-at-least-32-bytes",
    "jwt_audience": "batches.example",
    "jwt_issuer": "idp.example",
}


def test_a_secure_production_config_starts() -> None:
    settings = Settings(**SECURE)
    assert settings.insecure() == []
    Authenticator.from_settings(settings)


@pytest.mark.parametrize(("change", "named"), [
    ({"token_secret": DEFAULT_TOKEN_SECRET}, "DHUB_TOKEN_SECRET is the built-in default"),
    ({"token_secret": None}, "DHUB_TOKEN_SECRET is the built-in default"),
    ({"token_secret": "tiny-secret"}, "DHUB_TOKEN_SECRET is shorter than 16 bytes"),
    ({"webhook_secret": "fifteen-bytes-x"}, "DHUB_WEBHOOK_SECRET is shorter than 16 bytes"),
    ({"jwt_hs256_secret": "thirty-one-bytes-of-hs256-secre"}, "DHUB_JWT_HS256_SECRET"),
    ({"api_tokens": "a-static-token-0123456789,smol-token"}, "a static API token is shorter"),
    ({"api_token": "tiny-tok"}, "a static API token is shorter"),
    ({"jwt_audience": None}, "DHUB_JWT_AUDIENCE"),
    ({"jwt_audience": LOCAL_JWT_AUDIENCE}, "DHUB_JWT_AUDIENCE"),
    ({"jwt_issuer": None}, "DHUB_JWT_ISSUER"),
    ({"jwt_issuer": LOCAL_JWT_ISSUER}, "DHUB_JWT_ISSUER"),
])
def test_outside_local_insecure_settings_are_refused(change: dict[str, Any], named: str) -> None:
    values = {k: v for k, v in {**SECURE, **change}.items() if v is not None}
    with pytest.raises(InsecureSettings, match=named) as refused:
        Settings(**values)
    # The reason names settings, never their values.
    for secret in values.values():
        if isinstance(secret, str) and secret != "production":
            assert secret not in str(refused.value)


def test_an_empty_webhook_secret_is_the_webhook_off_not_a_short_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`DHUB_WEBHOOK_SECRET=` is how an env file often says "unset": the README says the
    webhook is then off; outside `local` it was a secret shorter than 16 bytes, and the
    API and the consumers refused to start."""
    for key, value in SECURE.items():
        if key != "webhook_secret":
            monkeypatch.setenv(f"DHUB_{key.upper()}", value)
    monkeypatch.setenv("DHUB_WEBHOOK_SECRET", "")
    settings = Settings()
    assert (settings.env, settings.webhook_secret, settings.insecure()) == (
        "production", None, [])


def test_the_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DHUB_ENV", "staging")
    with pytest.raises(InsecureSettings, match=r"DHUB_ENV='staging'.*DHUB_TOKEN_SECRET"):
        Settings()
    monkeypatch.setenv("DHUB_TOKEN_SECRET", SECURE["token_secret"])
    assert Settings().env == "staging"


def test_the_api_checks_again_at_startup() -> None:
    """Settings copied into place skip pydantic's validators; the API's startup does not."""
    copied = Settings().model_copy(update={"env": "production"})
    with pytest.raises(InsecureSettings, match="DHUB_TOKEN_SECRET"):
        Authenticator.from_settings(copied)


def test_the_local_stack_runs_on_its_defaults() -> None:
    settings = Settings(env="local", webhook_secret=SecretStr("short"),
                        jwt_hs256_secret=SecretStr("short"))
    assert settings.insecure()  # reported, not enforced
    settings.check_secure()
    assert (settings.jwt_audience, settings.jwt_issuer) == (LOCAL_JWT_AUDIENCE, LOCAL_JWT_ISSUER)
    assert Authenticator.from_settings(settings).issuer == LOCAL_JWT_ISSUER
