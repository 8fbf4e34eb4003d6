"""`stack.py status` (make status) and `stack.py run` (make run) printed each part's URL as
configured: DHUB_REDIS_URL's password in clear on stdout (a terminal, a CI log), where the
consumers' start line prints the same URL through core.logs.scrub, "the one masking rule ...
for a URL logged or printed on purpose". They print through it now."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from deploy.local.config import StackConfig
from deploy.local.parts.redis import PART
from deploy.local.stack import status
from tests.conftest import free_port

PASSWORD = "hunter2-redis-pw"


def test_status_does_not_print_the_redis_password(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://default:{PASSWORD}@127.0.0.1:{free_port()}/0"  # an external Redis
    settings = Settings(redis_url=url, state_dir=tmp_path)
    status(StackConfig(settings), [PART])
    out = capsys.readouterr().out
    assert PASSWORD not in out, out
