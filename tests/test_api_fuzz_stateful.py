"""schemathesis' stateful phase: sequences of calls linked through the responses (a batch id
from POST used by GET, stop and DELETE), checking that created resources are available and
deleted ones are gone, against the same in-process server as tests/test_api_fuzz.py."""

from __future__ import annotations

from typing import Any

import hypothesis

from tests.helpers import AUTH
from tests.test_api_fuzz import MAX_EXAMPLES, SCHEMA, fuzz_base_url  # noqa: F401  (the fixture)

STEPS = 10


def test_stateful_sequences(fuzz_base_url: str) -> None:  # noqa: F811
    base = SCHEMA.as_state_machine()

    class Workflow(base):  # type: ignore[valid-type, misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": fuzz_base_url, "headers": AUTH}

    Workflow.run(settings=hypothesis.settings(
        max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(hypothesis.HealthCheck)))
