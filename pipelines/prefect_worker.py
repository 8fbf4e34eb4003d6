"""Prefect's CLI, as the stack runs its worker: `python -m pipelines.prefect_worker worker start ...`.

The same as the `prefect` command, except that:
- Prefect's API clients share one verifying TLS context per CA file (`fork_preload`): the
  process worker makes several clients for every flow run it starts, and each loaded
  certifi's CA bundle on the worker's event loop (~60 ms here) between picking the run up and
  starting its process;
- a worker of the stack's work pool (DHUB_WORK_POOL) also polls when the commands consumer
  says it created a run (`worker_nudges`), not only every PREFECT_WORKER_QUERY_SECONDS.
"""

from __future__ import annotations

import prefect.client.orchestration  # noqa: F401 -- what the sharing is installed in
from prefect.cli import app
from prefect.workers.base import BaseWorker

from core.settings import get_settings
from pipelines.fork_preload import share_prefect_client_tls
from pipelines.worker_nudges import follow_nudges_in


def main() -> None:
    share_prefect_client_tls()
    settings = get_settings()
    follow_nudges_in(BaseWorker, settings.redis_url, settings.work_pool)
    app()  # exits through SystemExit with the command's own code


if __name__ == "__main__":
    main()
