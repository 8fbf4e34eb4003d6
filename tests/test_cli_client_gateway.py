"""`dhub run` / `DhubClient.run` against the real API: the first POST reaches the API and
starts the batch, its answer is lost (read timeout: the API is being redeployed); the retry,
same Idempotency-Key, is answered by the gateway in front with its own 404 page. The client
took that 4xx as the API's word that no attempt committed a batch and raised a plain
NotFound: no batch id, no RunUnsettled with the key to ask again, though the batch ran, and
a second `dhub run` started a second one. Only the API's own errors settle it now; a
gateway's is asked again with the same key."""

from __future__ import annotations

import httpx
import pytest

from dhub.client import DhubClient, RunUnsettled
from dhub.errors import DhubError
from tests.test_ui import api, base_url, register, token  # noqa: F401

pytestmark = pytest.mark.timeout(120)


class Redeploy(httpx.BaseTransport):
    """The real API for the first POST (its answer lost on the way back), then the gateway's
    own 404 page, then the real API again."""

    def __init__(self) -> None:
        self.real = httpx.HTTPTransport()
        self.posts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return self.real.handle_request(request)
        self.posts += 1
        if self.posts == 1:
            response = self.real.handle_request(request)
            response.read()
            assert response.status_code == 200, response.text
            raise httpx.ReadTimeout("timed out", request=request)
        if self.posts == 2:
            return httpx.Response(404, headers={"Content-Type": "text/html"},
                                  content=b"<html><body>default backend - 404</body></html>")
        return self.real.handle_request(request)

    def close(self) -> None:
        self.real.close()


def test_a_gateways_404_after_a_lost_answer_does_not_hide_the_started_batch(
        base_url: str, token: str) -> None:  # noqa: F811
    pipeline_id = register(base_url, token)
    auth = {"Authorization": f"Bearer {token}"}
    transport = Redeploy()
    outcome: object
    with DhubClient(base_url, token, transport=transport) as client:
        try:
            outcome = client.run(pipeline_id)
        except DhubError as exc:
            outcome = exc
    listed = httpx.get(f"{base_url}/api/v1/batches/{pipeline_id}/", headers=auth, timeout=10)
    started = list(listed.json()["items"])
    try:
        assert len(started) == 1, listed.text  # the first attempt did start a batch
        assert outcome == started[0] or isinstance(outcome, RunUnsettled), (
            f"the API started {started[0]}, `run` ended with "
            f"{type(outcome).__name__}: {outcome} (posts: {transport.posts})")
    finally:
        for batch_id in started:
            httpx.put(f"{base_url}/api/v1/batches/{pipeline_id}/{batch_id}/stop", headers=auth,
                      timeout=10)
