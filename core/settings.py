"""Typed settings, read from `DHUB_*` environment variables; defaults point at the local stack.

`DHUB_ENV` names the deployment. Only `local` (the default: the local stack) may run on the
built-in secrets; anywhere else constructing the settings fails (`check_secure`), so neither
the API nor the consumers start on a secret anyone can read in this repository.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
LOCAL = "local"
DEFAULT_TOKEN_SECRET = "dhub-local-paging"  # noqa: S105 -- refused outside local
# What JWTs minted for the local stack carry; anywhere else both must be configured.
LOCAL_JWT_AUDIENCE = "dhub-batches"
LOCAL_JWT_ISSUER = "dhub-local"
MIN_SECRET_BYTES = 16
# RFC 7518 3.2: an HS256 key of at least the hash's size.
MIN_HS256_SECRET_BYTES = 32


class InsecureSettings(RuntimeError):
    """Settings that must not run outside the local stack; the text says what to set.
    Not a ValueError on purpose: pydantic would wrap it in a ValidationError that echoes
    every input value, secrets included."""


class BadSetting(RuntimeError):
    """A DHUB_* value that cannot work as meant; the text names the variable, never its value
    (a RuntimeError for InsecureSettings' reason: pydantic would echo a URL's password)."""


def checked_redis_url(value: str, name: str = "DHUB_REDIS_URL") -> str:
    """`value` if it names a Redis database unambiguously; else BadSetting naming `name` (a
    variable or an option), never the URL (it may hold a password)."""
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise BadSetting(f"{name} must start with redis://, rediss:// or unix://")
    # redis-py reads the path as the database number and, when it is not one, silently
    # uses database 0 (`redis://host:6379/dhub`: another application's data, perhaps).
    database = parts.path.replace("/", "")
    if (parts.scheme != "unix" and database and not database.isdigit()
            and "db" not in parse_qs(parts.query)):
        raise BadSetting(f"{name}'s path {database!r} is not a database number "
                         "(redis://host:6379/<n>); Redis would use database 0 instead")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DHUB_", extra="ignore")

    # `local` (the local stack) or the deployment's name: outside `local`, default or short
    # secrets are refused.
    env: str = LOCAL
    # Where the local stack keeps its data, logs and generated secrets (ignored by git).
    state_dir: Path = ROOT / ".dhub"
    # Where pipeline steps keep batch data on a worker, each batch under <data_dir>/<batch_id>.
    # A server-side setting only: no value a client sends chooses a path. Unset: state_dir/data.
    data_dir: Path | None = None
    # The engine fork server's socket (pipelines/engine_forks.py), which flow runs started by
    # `pipelines.engine_command` ask for a Prefect engine already imported. Unset: the stack
    # puts it at state_dir/run/engine-forks.sock; nobody listening there: flow runs import
    # Prefect themselves, as `python -m prefect.engine` does.
    engine_forks_socket: Path | None = None

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_commands: str = "batches.commands"
    topic_events: str = "batches.events"
    topic_dlq: str = "batches.dlq"
    commands_partitions: int = 6
    events_partitions: int = 6
    dlq_partitions: int = 1
    # Compacted topics a rebuild of Redis reads (consumers.rebuild): every registered pipeline
    # version (key `<pipeline_id>/<version>`) and the latest snapshot of every batch (key
    # `<pipeline_id>/<batch_id>`, tombstoned at purge).
    topic_pipelines: str = "batches.pipelines"
    topic_snapshots: str = "batches.snapshots"
    snapshots_partitions: int = 6
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
    # The consumers process's `GET /metrics` (Prometheus); port 0: not served.
    consumers_metrics_host: str = "127.0.0.1"
    consumers_metrics_port: int = Field(default=9464, ge=0, le=65535)
    # Static bearer tokens, comma separated. Empty: the stack generates one into state_dir.
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_token: SecretStr | None = None
    jwt_hs256_secret: SecretStr | None = None
    jwt_rs256_public_key: str | None = None
    # Every JWT must carry `exp`, this `aud` and this `iss`. Required when JWTs are enabled
    # (a secret or public key set); in `local` they default to dhub-batches / dhub-local.
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Signs list paging tokens so a client cannot forge or reuse another pipeline's token.
    token_secret: SecretStr = SecretStr(DEFAULT_TOKEN_SECRET)
    webhook_secret: SecretStr | None = None
    # Bounded below so a bad value stops the start with an error naming the variable:
    # aiohttp reads a limit of 0 as "no limit" (any body accepted, memory unbounded).
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    # In-process cache of rendered batches, invalidated through Redis pub/sub.
    api_cache: bool = True
    # The cache's staleness bound after a silent network fault, or a feed lagging that far
    # behind, is cache_silence_s + 0.1 s
    # (keep it under 5 s); cache_ttl_s bounds a change that was made without its notification.
    cache_silence_s: float = 2.5
    cache_ttl_s: float = 10.0
    # A running step whose offsets have not moved for this long shows `stalled: true`.
    stall_after_s: float = Field(default=120.0, gt=0)
    cache_max_entries: int = 50_000
    # 0 or less made every key's commit fail (SET ... EX 0): each key freed after its
    # pending minute, and a retry then ran a second batch.
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)

    # How long a running flow waits a Kafka outage out (connecting, then each event) before
    # its step fails: the events are the run's only way to report.
    publish_deadline_s: float = 300.0

    # Per batch, how many recent event ids are remembered for de-duplication.
    # 0 forgot every id as soon as it was stored (no de-duplication at all).
    dedup_window: int = Field(default=1024, ge=1)

    # Finished (`stop`) batches are removed after this many days (Redis, its indexes and the
    # snapshot topic: the consumers' retention sweeper); 0 keeps them forever. At most a
    # century: a published batch's claim lasts the retention and more (SET ... EX), which
    # `inf` (taken for "forever") or some 10**12 days cannot be, and the commands consumer
    # then failed at every start while POSTs were answered.
    batch_retention_days: float = Field(default=30, ge=0, le=36_500)

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        # `DHUB_WEBHOOK_SECRET=` is how an env file often says "unset": the webhook is off,
        # and outside `local` that must not read as a short secret refusing the start.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_database(cls, value: str) -> str:
        return checked_redis_url(value)

    @model_validator(mode="after")
    def _by_environment(self) -> Settings:
        if self.env == LOCAL:
            # Filled even while JWTs are off: settings copied with a key added stay valid.
            self.jwt_audience = self.jwt_audience or LOCAL_JWT_AUDIENCE
            self.jwt_issuer = self.jwt_issuer or LOCAL_JWT_ISSUER
        else:
            self.check_secure()
        return self

    @property
    def jwt_enabled(self) -> bool:
        return self.jwt_hs256_secret is not None or self.jwt_rs256_public_key is not None

    @property
    def data_root(self) -> Path:
        """The directory batch data goes under (DHUB_DATA_DIR, else state_dir/data)."""
        return self.data_dir if self.data_dir is not None else self.state_dir / "data"

    def insecure(self) -> list[str]:
        """What makes these settings unfit outside the local stack (names, never values)."""
        problems = []
        token_secret = self.token_secret.get_secret_value()
        if token_secret == DEFAULT_TOKEN_SECRET:
            problems.append("DHUB_TOKEN_SECRET is the built-in default")
        elif len(token_secret.encode()) < MIN_SECRET_BYTES:
            problems.append(f"DHUB_TOKEN_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
        if (self.webhook_secret is not None
                and len(self.webhook_secret.get_secret_value().encode()) < MIN_SECRET_BYTES):
            problems.append(f"DHUB_WEBHOOK_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
        if (self.jwt_hs256_secret is not None and len(
                self.jwt_hs256_secret.get_secret_value().encode()) < MIN_HS256_SECRET_BYTES):
            problems.append(
                f"DHUB_JWT_HS256_SECRET is shorter than {MIN_HS256_SECRET_BYTES} bytes")
        configured = [t.get_secret_value() for t in self.api_tokens]
        if self.api_token is not None:
            configured.append(self.api_token.get_secret_value())
        if any(len(t.encode()) < MIN_SECRET_BYTES for t in configured):
            problems.append(f"a static API token is shorter than {MIN_SECRET_BYTES} bytes")
        if self.jwt_enabled and self.jwt_audience in (None, "", LOCAL_JWT_AUDIENCE):
            problems.append("DHUB_JWT_AUDIENCE is unset or the local stack's")
        if self.jwt_enabled and self.jwt_issuer in (None, "", LOCAL_JWT_ISSUER):
            problems.append("DHUB_JWT_ISSUER is unset or the local stack's")
        return problems

    def check_secure(self) -> None:
        """Raises `InsecureSettings` outside the local stack when a secret is a default or
        too short; a no-op in `local`."""
        if self.env == LOCAL:
            return
        problems = self.insecure()
        if problems:
            raise InsecureSettings(
                f"DHUB_ENV={self.env!r} refuses insecure settings: {'; '.join(problems)} "
                f"(DHUB_ENV={LOCAL} is for the local stack only)")

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
