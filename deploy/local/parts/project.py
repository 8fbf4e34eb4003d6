"""This repository's own processes: the API (`python -m service`) and the consumers
(`python -m consumers`)."""

from __future__ import annotations

import os
import secrets
import sys

from core.keys import HEARTBEAT_CONSUMERS
from deploy.local.config import StackConfig
from deploy.local.part import Part
from deploy.local.probes import http, redis_client
from deploy.local.procs import read_pid


def ensure_token(c: StackConfig) -> None:
    """A bearer token for the API unless one is configured; the file is readable by us only."""
    path = c.state / "api-token"
    if c.settings.api_token or c.settings.api_tokens or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    print(f"  generated an API token in {path}")


def register_demo(c: StackConfig) -> None:
    """Registers the demo `pipeline-sales` through the API's own registry endpoint, which also
    queues its Prefect deployment. Idempotent: the same version again answers 200."""
    from pipelines.sales import PIPELINE_ID, demo_spec  # the SDK: only once the API is up

    status, _ = http(f"{c.api_url}/api/v1/pipelines/{PIPELINE_ID}", demo_spec().model_dump(mode="json"),
                     method="PUT", timeout=10,
                     headers={"Authorization": f"Bearer {c.settings.static_tokens()[0]}"})
    if status not in (200, 201):
        raise RuntimeError(f"registering the demo pipeline answered {status}")


def before_consumers(c: StackConfig) -> None:
    ensure_token(c)
    # A heartbeat left by the last consumers run must not count as this one being ready.
    with redis_client(c) as r:
        r.delete(HEARTBEAT_CONSUMERS)


def consumers_ready(c: StackConfig) -> bool:
    """Alive, and the heartbeat key the consumers keep with a TTL is there."""
    if read_pid(c, "consumers") is None:
        return False
    with redis_client(c) as r:
        return bool(r.exists(HEARTBEAT_CONSUMERS))


API = Part("api", wave=1, command=lambda c: [sys.executable, "-m", "service"], module="service",
           ready=lambda c: http(f"{c.api_url}/healthz")[0] == 200, timeout_s=30,
           before=ensure_token, after=register_demo, url=lambda c: c.api_url)
CONSUMERS = Part("consumers", wave=3, command=lambda c: [sys.executable, "-m", "consumers"],
                 module="consumers", ready=consumers_ready, timeout_s=30, before=before_consumers,
                 url=lambda c: f"heartbeat {HEARTBEAT_CONSUMERS}")
