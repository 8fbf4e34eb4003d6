"""What the engine fork server prepares before forking: Prefect's client shares one verifying
TLS context per CA file instead of loading the CA bundle for every client."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import certifi

from core.settings import ROOT
from pipelines.fork_preload import SharedVerifyingContexts, share_verifying_contexts


def test_one_context_per_ca_file_and_a_new_one_when_the_file_changes(tmp_path: Path) -> None:
    shared = SharedVerifyingContexts()
    first = shared.create_default_context(cafile=certifi.where())
    assert shared.create_default_context(cafile=certifi.where()) is first
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname

    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())
    own = shared.create_default_context(cafile=str(bundle))
    assert own is not first
    os.utime(bundle, ns=(0, 0))  # replaced: its contexts are made again
    assert shared.create_default_context(cafile=str(bundle)) is not own


def test_each_thread_has_its_own(tmp_path: Path) -> None:
    import threading

    shared = SharedVerifyingContexts()
    mine = shared.create_default_context(cafile=certifi.where())
    theirs: list[ssl.SSLContext] = []
    other = threading.Thread(
        target=lambda: theirs.append(shared.create_default_context(cafile=certifi.where())))
    other.start()
    other.join()
    assert theirs[0] is not mine  # httpcore sets ALPN on it per connect: no cross-thread race
    assert shared.create_default_context(cafile=certifi.where()) is mine


def test_contexts_that_are_changed_after_creation_are_never_shared() -> None:
    shared = SharedVerifyingContexts()
    # Prefect's skip-verify path turns verification off on what it gets: always a new one.
    plain = shared.create_default_context()
    assert shared.create_default_context() is not plain
    client_side = ssl.Purpose.CLIENT_AUTH
    assert (shared.create_default_context(client_side, cafile=certifi.where())
            is not shared.create_default_context(client_side, cafile=certifi.where()))
    assert shared.SSLContext is ssl.SSLContext  # the rest is the ssl module's


def test_installed_only_in_the_module_given() -> None:
    module = ModuleType("stand_in")
    module.ssl = ssl  # type: ignore[attr-defined]
    share_verifying_contexts(module)
    assert isinstance(module.ssl, SharedVerifyingContexts)
    assert sys.modules["ssl"] is ssl


def test_the_server_prepares_prefects_client_before_forking() -> None:
    probe = (
        "import ssl, certifi, prefect.client.orchestration as c\n"
        "from pipelines.fork_preload import prepare\n"
        "prepare()\n"
        "a = c.ssl.create_default_context(cafile=certifi.where())\n"
        "print(type(c.ssl).__name__, a is c.ssl.create_default_context(cafile=certifi.where()),"
        " ssl.create_default_context is not c.ssl.create_default_context)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.split() == ["SharedVerifyingContexts", "True", "True"]


def test_the_stack_runs_prefects_own_cli_for_its_worker() -> None:
    import prefect

    out = subprocess.run([sys.executable, "-m", "pipelines.prefect_worker", "version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert prefect.__version__ in out.stdout
