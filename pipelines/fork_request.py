"""The engine fork server's side of its wire (`pipelines.engine_command` is the other): one
request read off an accepted connection, whole, within a deadline, with the requester's three
stdio fds passed beside it (SCM_RIGHTS)."""

from __future__ import annotations

import json
import os
import socket
import time

from pipelines.engine_command import HEADER, MAGIC
from pipelines.fork_child import Job

REQUEST_TIMEOUT_S = 5.0  # a requester that stalls mid-request cannot hold the server longer
MAX_REQUEST_BYTES = 16 << 20


class BadRequest(Exception):
    pass


class Probed(Exception):
    """Connected and closed without a word: a readiness probe."""


def read_request(conn: socket.socket) -> tuple[Job, list[int]]:
    """The request and the requester's three stdio fds; BadRequest after REQUEST_TIMEOUT_S in
    all (a requester sending a byte now and then cannot hold the server longer)."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S

    def recv(size: int) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BadRequest(f"not whole within {REQUEST_TIMEOUT_S:.0f} s")
        conn.settimeout(left)
        return conn.recv(size)

    conn.settimeout(REQUEST_TIMEOUT_S)
    head, fds, _flags, _addr = socket.recv_fds(conn, HEADER.size, 3)
    if not head and not fds:
        raise Probed
    try:
        while len(head) < HEADER.size:
            more = recv(HEADER.size - len(head))
            if not more:
                raise BadRequest("closed within the header")
            head += more
        magic, length = HEADER.unpack(head)
        if magic != MAGIC or length > MAX_REQUEST_BYTES or len(fds) != 3:
            raise BadRequest("not an engine_command request")
        body = bytearray()
        while len(body) < length:
            chunk = recv(min(length - len(body), 1 << 16))
            if not chunk:
                raise BadRequest("closed within the body")
            body += chunk
        raw = json.loads(body)
        return Job(str(raw["module"]), [str(a) for a in raw["argv"]],
                   {str(k): str(v) for k, v in raw["env"].items()}, str(raw["cwd"]),
                   int(raw.get("umask", 0o022))), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
