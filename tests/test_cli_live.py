"""`dhub watch`'s live view in a pseudo-terminal, and a watch that outlives its API process."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from tests.conftest import free_port
from tests.test_cli_support import ANSI, DHUB, STEPS, Cli, Lines, api_process, own_api_cli, run_in_pty

pytestmark = pytest.mark.timeout(240)
BAR = "━"  # rich's bar glyph


@pytest.fixture(scope="module")
def cli(live: Settings) -> Iterator[Cli]:
    yield from own_api_cli()


def frames(screen: str) -> list[str]:
    """What was drawn, frame by frame: rich redraws the live view after erasing it."""
    return [ANSI.sub("", frame) for frame in re.split(r"\r\x1b\[2K(?:\x1b\[1A\x1b\[2K)*", screen)]


def test_watch_draws_live_bars_per_step_and_partition_and_exits_0(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = cli.register(tmp_path, rows=2400, partitions=2, throttle=1200)
    code, screen = run_in_pty([str(DHUB), "run", pipeline_id, "--watch", "-v"], cli.env())
    assert code == 0, screen
    assert "\x1b[?25l" in screen, "no live display (the cursor was never hidden)"
    drawn = frames(screen)
    assert len(drawn) > 5, "the view was not redrawn as the batch moved"
    running = [f for f in drawn if re.search(r"extract\s+running", f)]
    assert running, "never drew extract running"
    # While running, offsets summed per step ("N rec", or "N/total rec" with the totals the
    # steps report) and a rate, and one row per partition.
    assert any(re.search(r"extract\s+running\s+\S*━\S*\s+[1-9][\d,]*(/[\d,]+)? rec", f)
               for f in running), running[-1]
    assert any(re.search(r"\d+(\.\d+k?)?/s", f) for f in running)
    assert any("partition_0" in f and "partition_1" in f for f in running), running
    last = drawn[-1]
    for step in STEPS:
        assert re.search(rf"{step}\s+success\s+━+\s+2,400(/2,400)? rec", last), last
    assert "completed" in last


def test_watch_in_a_terminal_exits_1_for_a_failed_batch(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = cli.register(tmp_path, rows=600, partitions=2, fail_at="load")
    code, screen = run_in_pty([str(DHUB), "run", pipeline_id, "--watch"], cli.env())
    assert code == 1, screen
    last = frames(screen)[-1]
    assert re.search(r"load\s+failed", last) and re.search(r"batch-\S+ failed: .*fail_at", last, re.S), last


def test_ctrl_c_leaves_the_watch_and_not_the_batch(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = cli.register(tmp_path, rows=20_000, partitions=2, throttle=500)
    batch_id = cli("run", pipeline_id).stdout.strip()
    code, screen = run_in_pty([str(DHUB), "watch", pipeline_id, batch_id], cli.env(),
                              interrupt_when=re.compile(r"extract\s+running"))
    assert code == 130, screen
    assert "\x1b[?25h" in screen, "the cursor was not shown again"
    assert f"{batch_id} is not stopped" in screen
    assert cli.json("get", pipeline_id, batch_id)["state"]["state"] == "running"
    assert cli("stop", pipeline_id, batch_id).returncode == 0


def test_watch_reconnects_when_its_api_restarts(live: Settings, tmp_path: Path) -> None:
    port = free_port()
    cli = Cli(f"http://127.0.0.1:{port}")
    with api_process(port):
        pipeline_id = cli.register(tmp_path, rows=6000, partitions=2, throttle=1500)
        lines = Lines(cli.popen("run", pipeline_id, "--watch", "--json"))
        batch_id = lines.until(lambda line: line["event"] == "created")["item"]
        lines.until(lambda line: line["event"] == "batch" and line["batch"]["state"]["state"] == "running")
    # That API process is gone: the watch says it is reconnecting, then carries on with the next.
    with lines:
        lines.until(lambda line: line["event"] == "reconnecting", timeout=30)
        with api_process(port):
            after: list[dict[str, Any]] = []

            def ended(line: dict[str, Any]) -> bool:
                after.append(line)
                return bool(line["event"] == "end")

            end = lines.until(ended, timeout=90)
            assert lines.proc.wait(10) == 0
    assert end["exit_code"] == 0 and end["batch"]["id"] == batch_id
    versions = [line for line in after if line["event"] == "batch"]
    assert versions and {line["via"] for line in versions} == {"stream"}, after
    # Resumed with Last-Event-ID: no version is delivered twice across the reconnect.
    assert len({line["etag"] for line in versions}) == len(versions)
