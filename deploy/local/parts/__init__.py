"""Every part of the local stack, in start order, and the environment each one runs in.

To add a part: a module here declaring `PART = Part(...)`, listed in PARTS below.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from deploy.local.config import StackConfig
from deploy.local.part import Part
from deploy.local.parts import kafka, postgres, prefect, project, redis

# Start order (`down` stops in reverse); a part of a later wave never comes before one of an
# earlier wave. Kafka's JVM start-up overlaps PostgreSQL's and then Prefect's (seconds each).
PARTS: tuple[Part, ...] = (redis.PART, kafka.PART, postgres.PART, prefect.SERVER, prefect.WORKER,
                           prefect.ENGINE_FORKS,
                           project.API, project.CONSUMERS)
NAMES = tuple(p.name for p in PARTS)
BY_NAME = {p.name: p for p in PARTS}


def waves(parts: Iterable[Part]) -> list[list[Part]]:
    """The given parts grouped by wave, waves in order, parts in start order within each."""
    chosen = set(parts)
    numbers = sorted({p.wave for p in chosen})
    return [[p for p in PARTS if p in chosen and p.wave == n] for n in numbers]


def environment(part: Part, c: StackConfig) -> dict[str, str]:
    env = dict(os.environ)  # passes every DHUB_* on: flow runs in the worker read them too
    env.update(prefect.prefect_env(c), DHUB_STATE_DIR=str(c.state),
               DHUB_ENGINE_FORKS_SOCKET=str(c.engine_forks_socket))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(c.root), env.get("PYTHONPATH")]))
    env.update(part.env)
    for key, value in part.env_defaults.items():
        env.setdefault(key, value)
    return env
