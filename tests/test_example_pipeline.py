"""The example plugin package (examples/wordcount, installed beside the project by `make setup`)
end to end on the whole stack: its pipeline registered through the API as the README shows,
a batch run by the worker from the plugin's code, its offsets and its result checked against
the text it generated. The API is a process of this tree (`python -m service`), so it reads the
plugins installed now; the worker starts every flow run in a new process, which does too."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from core.settings import ROOT, Settings
from tests.test_cli_support import api_process
from tests.test_e2e import Live, stopped

pytestmark = pytest.mark.timeout(240)
PARTS = ("part-0", "part-1", "part-2")


@pytest.fixture(scope="module")
def own_api(live: Settings) -> Iterator[str]:
    from tests.conftest import free_port

    port = free_port()
    with api_process(port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def api(live: Settings, own_api: str) -> AsyncIterator[Live]:
    token = live.static_tokens()[0]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        client = Live(live, session)
        client.base = own_api
        yield client


def example_definition(name: str, **config: Any) -> dict[str, Any]:
    """The README's definition (examples/wordcount/pipeline.json) under another name and size."""
    body: dict[str, Any] = orjson.loads((ROOT / "examples" / "wordcount" / "pipeline.json").read_bytes())
    body["name"] = name
    for step in body["steps"]:
        step["config"].update(config)
    return body


async def test_the_example_pipeline_runs_end_to_end_through_the_api(api: Live) -> None:
    status, steps = await api.call("GET", "/api/v1/steps")
    assert status == 200 and {"wordcount.generate", "wordcount.count", "wordcount.merge"} <= set(steps["items"])
    pipeline_id = f"wordcount-{uuid.uuid4().hex[:8]}"
    body = example_definition(pipeline_id, partitions=3, lines=3000, words_per_line=5, throttle=4500)
    status, registered = await api.call("PUT", f"/api/v1/pipelines/{pipeline_id}", json=body)
    assert status == 201, registered

    batch_id = await api.run(pipeline_id)
    seen: list[dict[str, Any]] = []
    final = await api.until(pipeline_id, batch_id, stopped, seen=seen)

    assert final["outcome"] == "completed", final
    steps_state = final["state"]["steps"]
    assert list(steps_state) == ["generate", "count", "merge"]
    for name, step in steps_state.items():
        assert step["state"] == "success", name
        assert step["offsets"] == dict.fromkeys(PARTS, 3000), name
    # Throttled to ~2 s a step: the watcher saw the plugin's offsets grow through the SDK.
    assert any(0 < sum(b["state"]["steps"][s]["offsets"].values()) < 9000
               for b in seen for s in ("generate", "count"))

    # The result, against the words counted here from the files the batch generated.
    root = api.settings.data_root / batch_id / "wordcount"
    expected: Counter[str] = Counter()
    for part in PARTS:
        lines = (root / "text" / f"{part}.txt").read_text().splitlines()
        assert len(lines) == 3000
        expected.update(word for line in lines for word in line.split())
    result = orjson.loads((root / "result.json").read_bytes())
    assert result["counts"] == dict(expected)
    assert (result["lines"], result["words"]) == (9000, 45_000)


async def test_the_example_pipeline_resumes_from_its_offsets(api: Live) -> None:
    pipeline_id = f"wordcount-{uuid.uuid4().hex[:8]}"
    body = example_definition(pipeline_id, partitions=3, lines=3000, words_per_line=5,
                              throttle=None, fail_at="count")
    status, registered = await api.call("PUT", f"/api/v1/pipelines/{pipeline_id}", json=body)
    assert status == 201, registered
    failed_id = await api.run(pipeline_id)
    failed = await api.until(pipeline_id, failed_id, stopped)
    assert failed["outcome"] == "failed", failed
    reached = failed["state"]["steps"]["count"]["offsets"]
    assert 0 < sum(reached.values()) < 9000, reached

    status, resumed = await api.call("POST", f"/api/v1/batches/{pipeline_id}/{failed_id}/resume",
                                     json={"config": {"count": {"fail_at": None}}})
    assert status == 200, resumed
    final = await api.until(pipeline_id, resumed["item"], stopped)
    assert final["outcome"] == "completed", final
    assert all(s["offsets"] == dict.fromkeys(PARTS, 3000) for s in final["state"]["steps"].values())

    root = api.settings.data_root / resumed["item"] / "wordcount"
    runs = [orjson.loads(line) for line in (root / "count-runs.jsonl").read_bytes().splitlines()]
    # The resumed count started where the failed one reported and counted only the rest.
    assert [(r["batch"], r["start"]) for r in runs][-1] == (resumed["item"], reached)
    assert runs[-1]["counted"] == {p: 3000 - reached[p] for p in PARTS}
    expected: Counter[str] = Counter()
    for part in PARTS:
        expected.update((root / "text" / f"{part}.txt").read_text().split())
    assert orjson.loads((root / "result.json").read_bytes())["counts"] == dict(expected)


def test_the_example_plugin_loads_in_a_core_without_the_shapes_data_mark(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The example is the template plugin authors copy, against a core they may not upgrade
    with it: it imported `SHAPES_DATA` from core, so in a core from before the mark it raised
    ImportError and `declarations()` left every wordcount step out."""
    import importlib
    import sys

    import core.step_catalogue as catalogue

    monkeypatch.delattr(catalogue, "SHAPES_DATA")  # as a core from before the mark
    monkeypatch.delitem(sys.modules, "dhub_wordcount.plugin", raising=False)
    plugin = importlib.import_module("dhub_wordcount.plugin")
    assert plugin.GENERATE.name == "wordcount.generate"
