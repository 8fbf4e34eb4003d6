"""What a child of the engine fork server does between the fork and its flow run.

It must end up as `python -m <module>` started in the requester's place would be: the
requester's stdio, environment, working directory, umask and arguments; Prefect's settings
and logging read from that environment; no handler, fd or lock of the server's. What an
interpreter fixes at its start and a fork cannot change (PYTHON* variables, the locale, the
time zone, the hash seed) must match the server's, or the server refuses the request and the
requester starts a fresh interpreter (`start_differs`).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import runpy
import signal
import sys
import time
import warnings
from dataclasses import dataclass

from pipelines.engine_command import PASSED_SIGNALS

# What a fork server passes on to a child it cannot change once its interpreter runs.
FIXED_AT_START = ("PYTHON", "LANG", "LC_", "TZ", "SSLKEYLOGFILE", "OPENSSL_")


@dataclass(frozen=True)
class Job:
    module: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int


def fixed_at_start(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(FIXED_AT_START)}


SERVER_START = fixed_at_start(dict(os.environ))


def start_differs(job: Job) -> str | None:
    """Why this job cannot be a fork of this server, or None."""
    wanted = fixed_at_start(job.env)
    differ = sorted(k for k in wanted.keys() | SERVER_START.keys()
                    if wanted.get(k) != SERVER_START.get(k))
    return f"set differently from the server's: {', '.join(differ)}" if differ else None


def enter(fds: list[int]) -> None:
    """In the child, right after the fork (signals still blocked): the requester's stdio in
    place of the server's, its signals back to their defaults, then unblocked, so a SIGTERM
    sent in between is delivered now, by the default action."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        if fd != target:
            os.close(fd)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*PASSED_SIGNALS, signal.SIGCHLD})


def reread_prefect_settings(server_env: dict[str, str]) -> None:
    """Prefect read its settings and set up logging at import, from the server's environment
    and working directory (a `.env` or `prefect.toml` there counts too): read them again from
    the child's. Logging is set up again (~0.15 s) only when its settings or any
    PREFECT_LOGGING_* variable (handler and logger overrides) differ."""
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging
    from prefect.settings import get_current_settings

    before = get_current_settings().logging
    refresh_global_settings_context()

    def logging_env(env: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in env.items() if k.startswith("PREFECT_LOGGING_")}

    if (get_current_settings().logging != before
            or logging_env(dict(os.environ)) != logging_env(server_env)):
        setup_logging(incremental=False)


def run(job: Job, server_env: dict[str, str]) -> None:
    """In the child: as `python -m job.module` started in the requester's place would."""
    os.chdir(job.cwd)
    os.umask(job.umask)
    os.environ.clear()
    os.environ.update(job.env)
    time.tzset()
    importlib.invalidate_caches()
    sys.path[0] = job.cwd  # `python -m` puts the working directory first
    sys.argv = [job.module, *job.argv]
    logging.getLogger("dhub.engine_forks").handlers.clear()
    if "prefect.context" in sys.modules:
        reread_prefect_settings(server_env)
    # runpy warns that the module was imported already: in this child that is the point.
    warnings.filterwarnings("ignore", f"'{re.escape(job.module)}' found in sys.modules",
                            RuntimeWarning)
    runpy.run_module(job.module, run_name="__main__", alter_sys=True)
