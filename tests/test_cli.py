"""`dhub`, the command line, as a subprocess against the live stack: every command, `--json`,
and the exit codes (0 completed, 1 failed, 2 stopped or deleted, 3 usage/auth/connection/API)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings, get_settings
from dhub import NotFound, exit_code
from dhub.aio import AsyncDhubClient
from tests.conftest import free_port
from tests.test_cli_support import DHUB, STEPS, Cli, Lines, ndjson, own_api_cli

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cli(live: Settings) -> Iterator[Cli]:
    yield from own_api_cli()
ORDER = ["pending", "scheduled", "running", "stop"]


def states(lines: list[dict[str, Any]]) -> list[str]:
    return [line["batch"]["state"]["state"] for line in lines if line["event"] == "batch"]


def assert_in_order(seen: list[str]) -> None:
    assert [ORDER.index(s) for s in seen] == sorted(ORDER.index(s) for s in seen), seen


def test_a_completed_batch_watched_on_the_stream_and_by_long_poll_exits_0(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = cli.register(tmp_path, rows=1200, partitions=2, throttle=1200)

    # run --watch --json: the new id first, then every version from the push stream, then end.
    out = cli("run", pipeline_id, "--watch", "--json")
    assert out.returncode == 0, out.stderr
    lines = ndjson(out.stdout)
    assert lines[0]["event"] == "created"
    first_id = lines[0]["item"]
    versions = [line for line in lines if line["event"] == "batch"]
    assert {line["via"] for line in versions} == {"stream"}
    assert all(line["batch"]["id"] == first_id for line in versions)
    assert_in_order(states(lines))
    assert "running" in states(lines)
    assert len({line["etag"] for line in versions}) == len(versions), "a version was repeated"
    end = lines[-1]
    assert end["event"] == "end" and end["exit_code"] == 0
    assert end["batch"]["outcome"] == "completed"
    assert end["batch"] == versions[-1]["batch"]
    # Offsets seen growing on the way, not only the final ones.
    done = [sum(line["batch"]["state"]["steps"]["extract"]["offsets"].values()) for line in versions]
    assert any(0 < d < 1200 for d in done), done

    # run (just the id), then watch the latest with long-poll GETs.
    out = cli("run", pipeline_id)
    assert out.returncode == 0, out.stderr
    second_id = out.stdout.strip()
    assert second_id.startswith("batch-") and second_id != first_id
    out = cli("watch", pipeline_id, "--no-stream", "--json")
    assert out.returncode == 0, out.stderr
    lines = ndjson(out.stdout)
    assert {line["via"] for line in lines} == {"poll"}
    assert {line["batch"]["id"] for line in lines} == {second_id}
    assert_in_order(states(lines))
    assert lines[-1]["event"] == "end" and lines[-1]["exit_code"] == 0

    # watch of a batch that already stopped: its last version and end at once, exit 0.
    out = cli("watch", pipeline_id, first_id, "--json")
    assert out.returncode == 0
    assert [line["event"] for line in ndjson(out.stdout)] == ["batch", "end"]

    # get (latest and by id), ls (newest first, --limit honoured) in JSON and for people.
    latest = cli.json("get", pipeline_id)
    assert latest["id"] == second_id and latest["outcome"] == "completed"
    # (Not == end["batch"]: a stopped batch may still gain its `reason` after the stream ends.)
    got = cli.json("get", pipeline_id, first_id)
    assert (got["id"], got["state"], got["outcome"]) == (first_id, end["batch"]["state"], "completed")
    assert list(cli.json("ls", pipeline_id)["items"]) == [second_id, first_id]
    assert list(cli.json("ls", pipeline_id, "--limit", "1")["items"]) == [second_id]
    out = cli("ls", pipeline_id)
    assert out.returncode == 0
    assert out.stdout.index(second_id) < out.stdout.index(first_id)
    assert "completed" in out.stdout and "✓✓✓" in out.stdout
    out = cli("get", pipeline_id, first_id, "-v")
    assert out.returncode == 0
    for word in (*STEPS, "partition_0", "partition_1", "success", "completed", "1,200 rec", "600 rec"):
        assert word in out.stdout, (word, out.stdout)


def test_a_failing_batch_exits_1(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = cli.register(tmp_path, rows=600, partitions=2, fail_at="transform")
    out = cli("run", pipeline_id, "--watch")
    assert out.returncode == 1, (out.stdout, out.stderr)
    batch_id = out.stdout.splitlines()[0]
    assert f"{batch_id} failed" in out.stdout
    # Piped, the watch logs one line per state change instead of redrawing bars.
    assert f"{batch_id} running extract=" in out.stdout
    assert f"{batch_id} stop extract=success transform=failed" in out.stdout
    batch = cli.json("get", pipeline_id, batch_id)
    assert batch["outcome"] == "failed"
    assert batch["state"]["steps"]["transform"]["state"] == "failed"
    # Watching it again afterwards answers the same.
    out = cli("watch", pipeline_id, batch_id, "--json")
    assert out.returncode == 1
    assert ndjson(out.stdout)[-1]["exit_code"] == 1


@contextlib.contextmanager
def _watch_until_running(cli: Cli, pipeline_id: str) -> Iterator[tuple[Lines, str]]:
    """`dhub run --watch --json` in the background, once it has shown extract's offsets move."""
    with Lines(cli.popen("run", pipeline_id, "--watch", "--json")) as lines:
        created = lines.until(lambda line: line["event"] == "created")
        lines.until(lambda line: line["event"] == "batch"
                    and sum(line["batch"]["state"]["steps"]["extract"]["offsets"].values()) > 0)
        yield lines, str(created["item"])


def test_a_stopped_batch_exits_2_and_rm_deletes_it(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = cli.register(tmp_path, rows=20_000, partitions=2, throttle=500)
    with _watch_until_running(cli, pipeline_id) as (lines, batch_id):
        assert cli.json("stop", pipeline_id, batch_id)["message"] == "Batch stopped successfully"
        end = lines.until(lambda line: line["event"] == "end", timeout=30)
        assert end["exit_code"] == 2 and end["batch"]["outcome"] == "cancelled"
        assert lines.next(time.monotonic() + 10) is None
        assert lines.proc.wait(10) == 2
    out = cli("stop", pipeline_id, batch_id)  # stopping a stopped batch is fine again
    assert (out.returncode, out.stdout.strip()) == (0, f"{batch_id} is stopped: cancelled")

    out = cli("rm", pipeline_id, batch_id)
    assert (out.returncode, out.stdout.strip()) == (0, "Batch deleted successfully")
    out = cli("get", pipeline_id, batch_id, "--json")
    assert out.returncode == 3 and out.stdout == ""
    error = json.loads(out.stderr)["error"]
    assert error["status"] == 404 and error["code"] == "not_found"


def test_a_batch_deleted_while_watched_exits_2(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = cli.register(tmp_path, rows=20_000, partitions=2, throttle=500)
    with _watch_until_running(cli, pipeline_id) as (lines, batch_id):
        assert cli.json("rm", pipeline_id, batch_id) == {"message": "Batch deleted successfully"}
        last = lines.until(lambda line: line["event"] in ("deleted", "end"), timeout=30)
        assert last["event"] == "deleted" and last["exit_code"] == 2
        assert lines.proc.wait(10) == 2


def test_pipelines_ls_show_register(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = f"cli-{uuid.uuid4().hex[:8]}"
    spec: dict[str, Any] = {"name": pipeline_id, "version": "1",
            "steps": [{"name": "extract", "uses": "sales.extract", "config": {"rows": 10}}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(spec))
    registered = cli.json("pipelines", "register", str(path))  # the id: the spec's name
    assert registered["id"] == pipeline_id and registered["created"] is True
    again = cli("pipelines", "register", str(path))
    assert again.returncode == 0 and again.stdout.startswith(f"unchanged: {pipeline_id} version 1")
    # From stdin, under another id given on the command line.
    other = f"{pipeline_id}-b"
    out = subprocess.run([str(DHUB), "pipelines", "register", "-", "--id", other, "--json"],
                         input=json.dumps(spec), env=cli.env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == other

    listed = cli.json("pipelines", "ls")["items"]
    assert {pipeline_id, other} <= set(listed)
    assert listed[pipeline_id]["latest"] == "1"
    shown = cli.json("pipelines", "show", pipeline_id)
    assert shown["versions"][0]["steps"] == spec["steps"]
    out = cli("pipelines", "ls")
    assert out.returncode == 0 and pipeline_id in out.stdout
    out = cli("pipelines", "show", pipeline_id)
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == pipeline_id

    # Version 1 again with another definition: the API's 409, exit 3.
    changed = {**spec, "steps": [{**spec["steps"][0], "config": {"rows": 11}}]}
    path.write_text(json.dumps(changed))
    out = cli("pipelines", "register", str(path), "--json")
    assert out.returncode == 3
    assert json.loads(out.stderr)["error"]["status"] == 409
    # A step the catalogue does not know: 400, exit 3, the API's message shown.
    path.write_text(json.dumps({**spec, "version": "2",
                                "steps": [{"name": "x", "uses": "os.system", "config": {}}]}))
    out = cli("pipelines", "register", str(path))
    assert out.returncode == 3 and "unknown step implementation" in out.stderr
    # Not YAML / not a mapping: usage errors, nothing sent.
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    out = cli("pipelines", "register", str(bad), "--json")
    assert out.returncode == 3 and json.loads(out.stderr)["error"]["code"] == "usage"
    out = cli("pipelines", "register", str(tmp_path / "missing.yaml"))
    assert out.returncode == 3 and "cannot read" in out.stderr


def test_usage_auth_and_connection_errors_exit_3(cli: Cli, tmp_path: Path) -> None:
    # Usage: argparse's own errors (its usual 2 would read as "stopped") and our checks.
    for args in (["ls"], ["bogus"], ["stop", "p"], ["ls", "p", "--limit", "0"], []):
        out = cli(*args)
        assert out.returncode == 3, (args, out.stdout, out.stderr)
    # An unknown pipeline: the API's 404.
    out = cli("get", f"nosuch-{uuid.uuid4().hex[:6]}", "--json")
    assert out.returncode == 3 and json.loads(out.stderr)["error"]["code"] == "not_found"
    # A wrong token, from DHUB_TOKEN: 401.
    out = cli("pipelines", "ls", DHUB_TOKEN="not-the-token")
    assert out.returncode == 3 and "401" in out.stderr
    # The token file of DHUB_STATE_DIR when DHUB_TOKEN is unset: this one is wrong too.
    (tmp_path / "api-token").write_text("wrong-token\n")
    out = cli("pipelines", "ls", "--json", DHUB_STATE_DIR=str(tmp_path), DHUB_TOKEN="")
    assert out.returncode == 3 and json.loads(out.stderr)["error"]["status"] == 401
    # No token anywhere: said so, nothing sent.
    empty = tmp_path / "empty"
    empty.mkdir()
    out = cli("pipelines", "ls", DHUB_STATE_DIR=str(empty), DHUB_TOKEN="")
    assert out.returncode == 3 and "no API token" in out.stderr
    # Nothing listening: a connection error, for reads and for watch alike.
    dead = f"http://127.0.0.1:{free_port()}"
    out = cli("ls", "p", DHUB_URL=dead)
    assert out.returncode == 3 and "cannot reach the API" in out.stderr
    out = cli("--url", dead, "watch", "p", "b", "--json")
    assert out.returncode == 3 and json.loads(out.stderr)["error"]["code"] == "connection"


async def test_the_asyncio_client_runs_and_watches_a_batch(cli: Cli, tmp_path: Path) -> None:
    pipeline_id = cli.register(tmp_path, rows=600, partitions=2, throttle=1200)
    async with AsyncDhubClient(cli.url, get_settings().static_tokens()[0]) as api:
        batch_id = await api.run(pipeline_id)
        events = [event async for event in api.watch(pipeline_id, batch_id)]
        assert events[-1].kind == "end" and events[-1].batch is not None
        assert exit_code(events[-1].batch) == 0
        assert {e.via for e in events} == {"stream"}
        assert_in_order([e.batch["state"]["state"] for e in events if e.kind == "batch" and e.batch])
        assert (await api.latest(pipeline_id))["id"] == batch_id
        assert [b["id"] async for b in api.batches(pipeline_id, 5)] == [batch_id]
        assert (await api.pipeline(pipeline_id))["latest"] == "1"
        with pytest.raises(NotFound):
            await api.get(pipeline_id, "batch-nosuch")
