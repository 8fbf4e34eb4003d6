"""The layers as the processes load them: the import contract (`make lint`) reads the source,
this proves what a fresh interpreter actually imports."""

from __future__ import annotations

import subprocess
import sys


def _loaded_roots(*modules: str) -> set[str]:
    code = ("import importlib, sys\n"
            f"for name in {list(modules)!r}: importlib.import_module(name)\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_the_api_process_loads_neither_the_steps_nor_prefect() -> None:
    roots = _loaded_roots("service.__main__", "service.app", "service.routes", "service.openapi")
    assert "service" in roots
    assert not roots & {"pipelines", "prefect", "consumers"}, roots


def test_core_loads_nothing_above_it() -> None:
    roots = _loaded_roots("core.step_catalogue", "core.store", "core.models", "core.settings")
    assert not roots & {"service", "consumers", "pipelines", "prefect"}, roots
