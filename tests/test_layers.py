"""The layers as the processes load them: the import contract (`make lint`) reads the source,
this proves what a fresh interpreter actually imports."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

from core.step_catalogue import GROUP, declarations


def _loaded(*modules: str, then: str = "") -> set[str]:
    """Every module a fresh interpreter holds after importing `modules` and running `then`."""
    code = ("import importlib, json, sys\n"
            f"for name in {list(modules)!r}: importlib.import_module(name)\n"
            f"{then}\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout))


def _with_packages(modules: set[str]) -> set[str]:
    return {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 2)}


def test_the_api_process_loads_neither_the_steps_nor_prefect() -> None:
    # Answering GET /api/v1/steps and building the OpenAPI document read every plugin's
    # declarations: that is all of the plugins the API may load.
    names = _loaded("service.__main__", "service.app", "service.routes", "service.openapi",
                    then="from service import openapi, step_routes\n"
                         "openapi.build(); step_routes._body()")
    roots = {m.split(".")[0] for m in names}
    assert "service" in roots
    assert not roots & {"prefect", "consumers"}, roots
    declared = {p.module for p in entry_points(group=GROUP)}
    assert declared <= names, "the API did not read the declarations"
    runs = {d.run.partition(":")[0] for d in declarations().values()}
    assert not names & (runs | {"pipelines.sdk", "pipelines.flow", "pipelines.steps"}), names & runs
    # Of the step plugins' packages, only the declaration modules and their packages.
    plugin_roots = {m.split(".")[0] for m in declared | runs}
    assert {m for m in names if m.split(".")[0] in plugin_roots} <= _with_packages(declared)


def test_core_loads_nothing_above_it() -> None:
    names = _loaded("core.step_catalogue", "core.store", "core.models", "core.settings")
    assert not {m.split(".")[0] for m in names} & {"service", "consumers", "pipelines", "prefect"}
