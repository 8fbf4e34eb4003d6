"""`dhub pipelines ls | show | register`: the pipeline registry on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from dhub.client import DhubClient
from dhub.commands import UsageError, emit
from dhub.models import EXIT_COMPLETED


def cmd_pipelines_ls(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    items = api.pipelines()
    if args.json:
        emit({"items": items})
        return EXIT_COMPLETED
    table = Table(box=None, header_style="bold")
    for column in ("PIPELINE", "NAME", "LATEST", "VERSIONS", "STEPS"):
        table.add_column(column)
    for pipeline_id, p in sorted(items.items()):
        latest = next((v for v in p["versions"] if v["latest"]), p["versions"][-1])
        steps = " → ".join(str(s.get("name")) for s in latest["steps"])
        table.add_row(pipeline_id, p["name"], p["latest"], str(len(p["versions"])), steps)
    console.print(table)
    return EXIT_COMPLETED


def cmd_pipelines_show(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    pipeline = api.pipeline(args.pipeline)
    if args.json:
        emit(pipeline)
    else:
        console.print_json(data=pipeline)
    return EXIT_COMPLETED


def read_spec(path: str) -> dict[str, Any]:
    """A pipeline definition from a YAML or JSON file (`-`: stdin); JSON is YAML too, but a
    `.json` file is read strictly."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        spec = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise UsageError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a pipeline definition is a mapping (name, version, steps)")
    return spec


def cmd_pipelines_register(args: argparse.Namespace, api: DhubClient, console: Console) -> int:
    spec = read_spec(args.file)
    # The id: --id, else an `id` key of the file (not part of the definition), else its name.
    file_id = spec.pop("id", None)
    pipeline_id = args.id or file_id or spec.get("name")
    if not isinstance(pipeline_id, str) or not pipeline_id:
        raise UsageError("no pipeline id: give --id, or `id` or `name` in the file")
    pipeline = api.register(pipeline_id, spec)
    if args.json:
        emit(pipeline)
    else:
        what = "registered" if pipeline.get("created") else "unchanged:"
        console.print(f"{what} {pipeline_id} version {spec.get('version')} "
                      f"(latest {pipeline['latest']})", highlight=False)
    return EXIT_COMPLETED
