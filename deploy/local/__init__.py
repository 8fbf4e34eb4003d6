"""The local stack: Redis, Kafka, PostgreSQL, Prefect server and worker, the API, the consumers.

`stack.py` is the process manager and CLI; `parts/` declares each part (one `Part` each, one
module per engine); `config.py` is what every part is given (the settings, file locations,
addresses); `procs.py` finds and stops a part's processes. Nothing runs at import time.
"""
