"""Small Starlette helpers the Serve replica's parts share: the route under the app's prefix, a JSON answer."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from serving.errors import encode_json


def subpath(request: Request) -> str:
    """The request's path under the app's route prefix (``root_path``), without a trailing slash."""
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


def json_response(status: int, payload: dict[str, Any]) -> Response:
    return Response(encode_json(payload), status_code=status, media_type="application/json")
