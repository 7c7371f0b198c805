"""alertgate's Azure Functions entry point: bindings and HTTP translation only.

Everything else lives in `shared/` as plain async Python (see shared/api.py). Settings are read and
validated here at import, so a misconfigured app stops at start-up with a message naming each bad
setting instead of failing on its first request.
"""

from __future__ import annotations

import azure.functions as func

from shared import api, runtime

runtime.settings()  # fail fast: raises SettingsError naming every invalid setting

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


def _request(req: func.HttpRequest) -> api.ApiRequest:
    return api.ApiRequest(
        method=req.method,
        url=req.url,
        headers=dict(req.headers),
        body=req.get_body(),
        query=dict(req.params),
        route_params=dict(req.route_params),
    )


def _response(res: api.ApiResponse) -> func.HttpResponse:
    return func.HttpResponse(body=res.body, status_code=res.status, headers=res.headers)


@app.route(route="alerts/batchUpdate", methods=["POST"])
async def batch_update(req: func.HttpRequest) -> func.HttpResponse:
    return _response(await api.guarded(api.batch_update, _request(req)))


@app.route(route="health", methods=["GET"])
async def health(req: func.HttpRequest) -> func.HttpResponse:
    return _response(await api.guarded(api.health, _request(req)))


async def shutdown() -> None:
    """Close the worker's aiohttp session and credentials (called by the development host on exit)."""
    await runtime.shutdown()
