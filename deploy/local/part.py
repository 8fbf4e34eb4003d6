"""One declaration per stack part: everything `stack.py` needs to start, check and stop it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from deploy.local.config import StackConfig

Hook = Callable[[StackConfig], None]


@dataclass(frozen=True, eq=False)  # identity: parts are singletons, kept in sets
class Part:
    name: str
    # Parts of one wave start together, a wave once every part of the earlier ones is ready.
    wave: int
    command: Callable[[StackConfig], list[str]]
    # May raise: any failure (refused, timeout, an odd answer) means "not ready yet".
    ready: Callable[[StackConfig], bool]
    timeout_s: float  # from spawning to ready
    url: Callable[[StackConfig], str]  # what `status` and `run` print
    # On top of the environment every part gets (parts.environment); `env_defaults` unless
    # the caller's environment already sets them.
    env: Mapping[str, str] = field(default_factory=dict)
    env_defaults: Mapping[str, str] = field(default_factory=dict)
    before: Hook | None = None  # before spawning
    after: Hook | None = None  # once ready, also when found running: must be idempotent
    # This repository's package the part runs with `python -m`; skipped while it has no
    # __main__.py.
    module: str | None = None
    stop_timeout_s: float = 15  # from SIGTERM to SIGKILL

    def present(self, config: StackConfig) -> bool:
        return self.module is None or (config.root / self.module / "__main__.py").exists()

    def is_ready(self, config: StackConfig) -> bool:
        try:
            return self.ready(config)
        except Exception:  # see `ready`
            return False
