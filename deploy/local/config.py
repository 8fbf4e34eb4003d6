"""What every part is given: the settings, where the stack keeps its files, and the servers'
addresses, each port read from its URL.

Ports: the URL is the one source (DHUB_REDIS_URL, DHUB_PREFECT_API_URL, DHUB_KAFKA_BOOTSTRAP).
Settings still holds DHUB_REDIS_PORT and DHUB_PREFECT_PORT, which repeat it; left unset they
follow the URL, and set to another port they are refused (`port_mismatch`), since the server
would then listen where no client looks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv running the stack also runs its Python parts


def hostport(url_or_pair: str, default_port: int = 0) -> tuple[str, int]:
    """('127.0.0.1', 9092) from a URL or from the first `host:port` of a bootstrap list."""
    u = urlsplit(url_or_pair if "//" in url_or_pair else f"//{url_or_pair.split(',')[0]}")
    return u.hostname or "127.0.0.1", int(u.port or default_port)


@dataclass(frozen=True)
class StackConfig:
    settings: Settings
    root: Path = ROOT

    @property
    def state(self) -> Path:
        return self.settings.state_dir.resolve()

    def pid_file(self, part: str) -> Path:
        return self.state / "run" / f"{part}.pid"

    def log_file(self, part: str) -> Path:
        return self.state / "logs" / f"{part}.log"

    @property
    def engine_forks_socket(self) -> Path:
        """Where the engine fork server listens; the worker's flow runs find it there."""
        return self.settings.engine_forks_socket or self.state / "run" / "engine-forks.sock"

    @property
    def redis_port(self) -> int:
        return hostport(self.settings.redis_url, 6379)[1]

    @property
    def kafka(self) -> tuple[str, int]:
        return hostport(self.settings.kafka_bootstrap, 9092)

    @property
    def prefect(self) -> tuple[str, int]:
        return hostport(self.settings.prefect_api_url, 80)

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def port_mismatch(self) -> str | None:
        """Why DHUB_REDIS_PORT / DHUB_PREFECT_PORT, when set, contradict their URL, or None."""
        s = self.settings
        for name, field, port, url, from_url in [
            ("REDIS", "redis_port", s.redis_port, s.redis_url, self.redis_port),
            ("PREFECT", "prefect_port", s.prefect_port, s.prefect_api_url, self.prefect[1]),
        ]:
            if field in s.model_fields_set and port != from_url:
                return f"DHUB_{name}_PORT={port} does not match the port in {url}"
        return None
