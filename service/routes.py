"""Every route of the API, one per line. `/{pipeline_id}` and `/{pipeline_id}/` differ on purpose:
the first is the latest batch, the second (trailing slash) the paged list. The patterns do not
overlap, so order only matters for speed: aiohttp tries them in turn, the hot GET comes first.
The route names are the OpenAPI document's operation ids (service.openapi). Each handler is
wrapped in the edge (request id, authentication, JSON errors, metrics) where it is registered;
the app has no aiohttp middleware. A route names the scope its token needs, checked by the
edge before the handler runs."""

from __future__ import annotations

from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from service import (
    batches,
    docs,
    health,
    listing,
    metrics,
    pipeline_routes,
    resume,
    runs,
    schemas,
    step_routes,
    ui,
    webhook,
)
from service.auth import (
    METRICS_READ,
    PIPELINES_WRITE,
    READ,
    WRITE,
    Authenticator,
    authentication,
    bearer_check,
    protected,
)
from service.errors import Observe, at_edge

# (method, path, handler, name, the scope its token needs: None for a public route)
ROUTES: Final[tuple[tuple[str, str, Handler, str, str | None], ...]] = (
    ("GET", "/api/v1/batches/{pipeline_id}/{batch_id}", batches.get_batch, "get_batch", READ),
    ("POST", "/api/v1/batches/{pipeline_id}", runs.run_batch, "run_batch", WRITE),
    ("GET", "/api/v1/batches/{pipeline_id}", batches.latest_batch, "latest_batch", READ),
    ("GET", "/api/v1/batches/{pipeline_id}/", listing.list_batches, "list_batches", READ),
    ("PUT", "/api/v1/batches/{pipeline_id}/{batch_id}/stop", batches.stop_batch, "stop_batch", WRITE),
    ("POST", "/api/v1/batches/{pipeline_id}/{batch_id}/resume", resume.resume_batch, "resume_batch", WRITE),
    ("DELETE", "/api/v1/batches/{pipeline_id}/{batch_id}", batches.delete_batch, "delete_batch", WRITE),
    ("PUT", "/api/v1/pipelines/{pipeline_id}", pipeline_routes.put_pipeline, "put_pipeline", PIPELINES_WRITE),
    ("GET", "/api/v1/pipelines/{pipeline_id}", pipeline_routes.get_pipeline, "get_pipeline", READ),
    ("GET", "/api/v1/pipelines/", pipeline_routes.list_pipelines, "list_pipelines", READ),
    ("GET", "/api/v1/steps", step_routes.list_steps, "list_steps", READ),
    ("POST", "/api/v1/hooks/prefect", webhook.prefect_webhook, "prefect_webhook", None),
    ("GET", "/api/v1/openapi.json", docs.openapi_json, "openapi", None),
    ("GET", "/api/v1/schemas", schemas.list_schemas, "message_schemas", None),
    ("GET", "/api/v1/schemas/{name}", schemas.get_schema, "message_schema", None),
    ("GET", "/docs", docs.docs_page, "docs", None),
    ("GET", "/healthz", health.healthz, "healthz", None),
    ("GET", "/readyz", health.readyz, "readyz", None),
    ("GET", "/metrics", metrics.metrics, "metrics", METRICS_READ),
    ("GET", "/ui/", ui.page, "ui", None),
    ("GET", "/ui/{name}", ui.page, "ui_file", None),
    ("GET", "/ui", ui.page, "ui_bare", None),
)
# The route of every request no route above matched, in /metrics too.
UNMATCHED: Final = "unmatched"


def operation_ids() -> dict[tuple[str, str], str]:
    """(lower-case method, path) -> route name."""
    return {(method.lower(), path): name for method, path, _, name, _ in ROUTES}


def setup_routes(app: web.Application, authenticator: Authenticator,
                 observe: Observe | None = None) -> None:
    """Every route behind the edge (service.errors.at_edge), then the catch-all that answers
    what matched none of them. Whether a route needs a token is decided here, once."""
    for method, path, handler, name, scope in ROUTES:
        check = bearer_check(authenticator, scope) if protected(path) else None
        wrapped = at_edge(handler, name, check, observe)
        if method == "GET":  # with HEAD, as aiohttp's add_get does
            app.router.add_get(path, wrapped, name=name)
        else:
            app.router.add_route(method, path, wrapped, name=name)
    # Registered last, and the shortest prefix of all (`/`): the router tries it after every
    # other route, and a root-level route added after it would be hidden behind it.
    # `[\s\S]`, not `.`: aiohttp matches the decoded path, and a `%0A` in it is a newline,
    # which `.` does not match.
    app.router.add_route("*", r"/{unmatched:[\s\S]*}",
                         at_edge(unmatched, UNMATCHED, authentication(authenticator), observe),
                         name=UNMATCHED)


async def unmatched(request: web.Request) -> web.StreamResponse:
    """A path no route has (404), or one that has routes for other methods only (405, with
    their Allow): aiohttp's own answers, raised here so that the edge answers them as JSON.
    The router tries this route last: its pattern is the shortest prefix of all."""
    catch_all = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not catch_all:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()
