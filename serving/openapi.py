"""OpenAPI 3 documents of nodewise's endpoints, served at ``GET /openapi.json`` by each of them: the
Ray Serve app (under its route prefix), DeepSpeed's rank 0 and the webhook receiver. Clients can
generate code from them; the fuzz suite (tests/integration/test_fuzz_endpoints.py, and
benchmarks/fuzz.py) generates requests from them with schemathesis.
"""

from __future__ import annotations

from typing import Any

ERROR = {
    "type": "object",
    "required": ["error_code", "message"],
    "properties": {"error_code": {"type": "string"}, "message": {"type": "string"}},
}
_MATRIX = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
SCORING_REQUEST = {
    "oneOf": [
        {"type": "object", "required": ["inputs"], "properties": {"inputs": {}}},
        {"type": "object", "required": ["instances"], "properties": {"instances": {}}},
        {
            "type": "object",
            "required": ["dataframe_split"],
            "properties": {
                "dataframe_split": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"columns": {"type": "array", "items": {"type": "string"}}, "data": _MATRIX},
                }
            },
        },
        {
            "type": "object",
            "required": ["dataframe_records"],
            "properties": {"dataframe_records": {"type": "array", "items": {"type": "object"}}},
        },
    ]
}


_GREEDY = "0 (the default) and anything below 1e-05 are greedy"
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
GENERATE_REQUEST = {
    "type": "object",
    "properties": {
        "prompt": _TEXTS,
        "input_ids": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "max_new_tokens": {"type": "integer", "minimum": 1},
        # sampling (serving/engine.py's SamplingParams)
        "temperature": {"type": "number", "minimum": 0, "maximum": 100, "description": _GREEDY},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer", "nullable": True},
        "stop": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string"}}]},
        "stream": {"type": "boolean", "description": "tokens as Server-Sent Events (one prompt)"},
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(s): {"description": _REASONS[s], "content": content} for s in statuses}


_REASONS = {
    400: "a request the client must fix; the message names the problem",
    401: "no valid signature",
    404: "no such route",
    408: "the body stopped before its Content-Length",
    413: "the body is over the size limit",
    415: "a content type the endpoint does not take",
    500: "a bug: the message has a request id that the server logged",
    502: "the Prefect API did not take the event (the sender retries)",
    503: "not ready (loading, or a rank is not)",
    504: "the computation took too long",
}


def _json_response(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _get(summary: str, *statuses: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": _json_response(summary), **_errors(*statuses)}}}


def document(title: str, version: str, paths: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """An OpenAPI 3.0 document with the shared error body; ``prefix``: the route prefix it is under."""
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": version},
        "servers": [{"url": prefix or "/"}],
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }


def scoring_paths(generate: bool = False) -> dict[str, Any]:
    """MLflow's scoring protocol (``/invocations``, ``/ping``, ``/health``, ``/version``), and
    ``/generate`` for a causal LM on DeepSpeed ranks."""
    predictions = {"type": "object", "required": ["predictions"], "properties": {"predictions": {}}}
    paths: dict[str, Any] = {
        "/invocations": {
            "post": {
                "summary": "score rows with the model (the protocol of `mlflow models serve`)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": SCORING_REQUEST},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "200": _json_response("the model's predictions", predictions),
                    **_errors(400, 408, 413, 415, 500, 503, 504),
                },
            }
        },
        "/ping": _get("200 when ready", 503),
        "/health": _get("readiness (and, on DeepSpeed, every rank's state)", 503),
        "/version": _get("the model and version served"),
    }
    if generate:
        paths["/generate"] = {
            "post": {
                "summary": "greedy generation from text prompts or token ids",
                "requestBody": {"required": True, "content": {"application/json": {"schema": GENERATE_REQUEST}}},
                "responses": {
                    "200": _json_response("generated text or token ids"),
                    **_errors(400, 408, 413, 500, 503, 504),
                },
            }
        }
        paths.update(openai_paths())
    return paths


_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "temperature": {"type": "number", "minimum": 0, "maximum": 100, "nullable": True, "description": _GREEDY},
    "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "nullable": True},
    "top_k": {"type": "integer", "minimum": -1, "nullable": True},
    "seed": {"type": "integer", "nullable": True},
    "stop": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string"}}]},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "model": {"type": "string"},
        "prompt": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                _IDS,
                {"type": "array", "items": _IDS},
            ]
        },
        **_SAMPLING,
    },
}
CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
            },
        },
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        **_SAMPLING,
    },
}


def openai_paths() -> dict[str, Any]:
    """The OpenAI-compatible routes (serving/openai_api.py), errors in OpenAI's shape."""

    def errors(*statuses: int) -> dict[str, Any]:
        content = {"application/json": {"schema": _OPENAI_ERROR}}
        return {str(s): {"description": _REASONS[s], "content": content} for s in statuses}

    def post(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                "responses": {
                    "200": _json_response(summary + " (text/event-stream when stream is true)"),
                    **errors(400, 404, 408, 413, 500, 503, 504),
                },
            }
        }

    return {
        "/v1/completions": post("an OpenAI completion", COMPLETION_REQUEST),
        "/v1/chat/completions": post("an OpenAI chat completion, through the model's chat template", CHAT_REQUEST),
        "/v1/models": _get("the model served, as OpenAI lists models"),
    }


def webhook_paths() -> dict[str, Any]:
    """The receiver: MLflow's signed webhook deliveries, and its health."""
    headers = [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
        for name in ("X-MLflow-Delivery-Id", "X-MLflow-Timestamp", "X-MLflow-Signature")
    ]
    payload = {
        "type": "object",
        "required": ["entity", "action", "data"],
        "properties": {
            "entity": {"type": "string"},
            "action": {"type": "string"},
            "data": {"type": "object", "properties": {"name": {"type": "string"}, "alias": {"type": "string"}}},
        },
    }
    return {
        "/webhook": {
            "post": {
                "summary": "an MLflow webhook delivery (HMAC-signed)",
                "parameters": headers,
                "requestBody": {"required": True, "content": {"application/json": {"schema": payload}}},
                "responses": {
                    "200": _json_response("ignored (another event, alias or model, or a replay)"),
                    "202": _json_response("a promotion, announced as a Prefect event"),
                    **_errors(400, 401, 408, 413, 500, 502),
                },
            }
        },
        "/health": _get("200 while the receiver runs"),
    }
