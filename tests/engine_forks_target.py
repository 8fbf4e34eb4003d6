"""What tests/test_engine_forks.py runs through `pipelines.engine_command`: it reports where
and as what it runs, then does what its first argument says."""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> None:
    report = {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
              "marker": os.environ.get("ENGINE_FORKS_MARKER"), "name": __name__,
              "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
              "umask": os.umask(0o022)}
    if "prefect.context" in sys.modules:
        from prefect.settings import get_current_settings

        report["prefect_api_url"] = get_current_settings().api.url
    print(json.dumps(report), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    action = sys.argv[1] if len(sys.argv) > 1 else "exit0"
    if action == "trap":  # says so on SIGTERM, then ends with 7
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(7)))
        print("ready", flush=True)
        signal.pause()
    elif action == "kill9":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        print("ready", flush=True)
        while True:
            time.sleep(60)
    sys.exit(int(action.removeprefix("exit")))


if __name__ == "__main__":
    main()
