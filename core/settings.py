"""Typed settings, read from `DHUB_*` environment variables; defaults point at the local stack."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DHUB_", extra="ignore")

    # Where the local stack keeps its data, logs and generated secrets (ignored by git).
    state_dir: Path = ROOT / ".dhub"

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_commands: str = "batches.commands"
    topic_events: str = "batches.events"
    topic_dlq: str = "batches.dlq"
    commands_partitions: int = 6
    events_partitions: int = 6
    dlq_partitions: int = 1
    group_commands: str = "dhub-commands"
    group_events: str = "dhub-events"

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_port: int = 6379

    prefect_api_url: str = "http://127.0.0.1:4200/api"
    prefect_port: int = 4200
    # The Prefect server's database. Unset: the local stack's PostgreSQL on postgres_port
    # (5433, beside any system PostgreSQL on 5432).
    prefect_db_url: str | None = None
    postgres_port: int = 5433
    work_pool: str = "dhub-local"

    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # Static bearer tokens, comma separated. Empty: the stack generates one into state_dir.
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_token: SecretStr | None = None
    jwt_hs256_secret: SecretStr | None = None
    jwt_rs256_public_key: str | None = None
    jwt_audience: str | None = None
    # Signs list paging tokens so a client cannot forge or reuse another pipeline's token.
    token_secret: SecretStr = SecretStr("dhub-local-paging")
    webhook_secret: SecretStr | None = None
    max_body_bytes: int = 1 << 20
    # In-process cache of rendered batches, invalidated through Redis pub/sub.
    api_cache: bool = True
    idempotency_ttl_s: int = 24 * 3600

    # Per batch, how many recent event ids are remembered for de-duplication.
    dedup_window: int = 1024

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    def static_tokens(self) -> list[str]:
        """Every accepted static token: DHUB_API_TOKENS, DHUB_API_TOKEN, else the generated one."""
        tokens = [t.get_secret_value() for t in self.api_tokens]
        if self.api_token is not None:
            tokens.append(self.api_token.get_secret_value())
        if not tokens:
            generated = self.state_dir / "api-token"
            if generated.exists():
                tokens.append(generated.read_text().strip())
        return tokens


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
