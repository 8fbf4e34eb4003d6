"""The JSON Schemas of the Kafka messages, generated from the classes `core.codec` decodes
into (`core.messages`), so what upstream services validate against is what the consumers
enforce.

    python -m core.jsonschemas            # rewrites schemas/*.json
    python -m core.jsonschemas --check    # fails when a committed file differs

`tests/test_codec_schemas.py` runs the check, so the committed files cannot drift.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from core.command_messages import COMMAND_KINDS, PUBLISHED_BATCH_REGEX, AnyCommand
from core.messages import EVENT_KINDS, AnyEvent

SCHEMA_DIR: Final = Path(__file__).resolve().parent.parent / "schemas"
DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def _document(name: str, title: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": DIALECT, "$id": f"dhub-batches/{name}.json", "title": title,
            **schema}


def _with_run_rules(schema: dict[str, Any]) -> dict[str, Any]:
    """Adds what msgspec cannot say of a run: with `create` (a publisher's own batch), the
    batch id is `batch-` + an id, as `Run.__post_init__` checks."""
    run = schema.get("$defs", {}).get("Run")
    if run is not None:
        run["dependentSchemas"] = {"create": {"properties": {
            "batch_id": {"pattern": PUBLISHED_BATCH_REGEX}}}}
    return schema


def _with_stop_rules(schema: dict[str, Any]) -> dict[str, Any]:
    """Adds what msgspec cannot say of a batch.state event, as `BatchState.__post_init__`
    checks: a `stop` carries an outcome, and no other state carries an outcome or a reason."""
    state = schema.get("$defs", {}).get("BatchState")
    if state is not None:
        state["if"] = {"properties": {"state": {"const": "stop"}}}
        state["then"] = {"required": ["outcome"],
                         "properties": {"outcome": {"not": {"type": "null"}}}}
        state["else"] = {"properties": {"outcome": {"type": "null"},
                                        "reason": {"type": "null"}}}
    return schema


def generate() -> dict[str, dict[str, Any]]:
    """Every schema by name: `events` and `commands` (any kind, chosen by `type`), and one
    per kind (`event.step.offsets`, `command.run`, ...)."""
    out = {
        "events": _document("events", "Any event of the batches.events topic",
                            _with_stop_rules(msgspec.json.schema(AnyEvent))),
        "commands": _document("commands", "Any command of the batches.commands topic",
                              _with_run_rules(msgspec.json.schema(AnyCommand))),
    }
    for tag, event in EVENT_KINDS.items():
        out[f"event.{tag}"] = _document(f"event.{tag}", f"The {tag} event",
                                        _with_stop_rules(msgspec.json.schema(event)))
    for tag, command in COMMAND_KINDS.items():
        out[f"command.{tag}"] = _document(f"command.{tag}", f"The {tag} command",
                                          _with_run_rules(msgspec.json.schema(command)))
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """The schema files that are missing, differ from the generated ones, or are extra."""
    wanted = {f"{name}.json": render(schema) for name, schema in generate().items()}
    found = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    out = sorted(found - set(wanted))
    for filename, text in wanted.items():
        path = directory / filename
        if not path.exists() or path.read_text() != text:
            out.append(filename)
    return out


def write(directory: Path = SCHEMA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.json"):
        old.unlink()
    for name, schema in generate().items():
        (directory / f"{name}.json").write_text(render(schema))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR)
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(args.dir)
        if bad:
            print(f"stale schemas in {args.dir}: {', '.join(bad)}; "
                  "run `python -m core.jsonschemas`", file=sys.stderr)
            return 1
        return 0
    write(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
