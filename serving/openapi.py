"""OpenAPI 3.1 documents of nodewise's endpoints, generated from the pydantic models of their
bodies (``serving/protocol.py``: the LLM requests; ``serving/_bodies.py``: the answers, errors,
scoring and webhook bodies), served at ``GET /openapi.json`` by each endpoint: the Ray Serve app
(under its route prefix), DeepSpeed's rank 0 and the webhook receiver. Clients can generate code
from them; the fuzz suite (testkit/fuzzing.py, benchmarks/fuzz.py) generates requests from
them with schemathesis.

The paths name their bodies by model (``_ref``); ``document`` puts the schemas of the models the
paths use, and of the models those use, under ``components/schemas``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serving import _bodies as bodies
from serving import protocol

REF = "#/components/schemas/{model}"
_REQUESTS = (protocol.CompletionRequest, protocol.ChatRequest, protocol.GenerateRequest)
_MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m
    for m in (*_REQUESTS, *(v for v in vars(bodies).values() if isinstance(v, type) and issubclass(v, BaseModel)))
    if not m.__name__.startswith("_")
}
_REASONS = {
    400: "a request the client must fix; the message names the problem",
    401: "no valid signature",
    404: "no such route (an OpenAI route: or another model)",
    408: "the body stopped before its Content-Length",
    413: "the body is over the size limit",
    415: "a content type the endpoint does not take",
    500: "a bug: the message has a request id that the server logged",
    502: "the Prefect API did not take the event (the sender retries)",
    503: "not ready (loading, or a rank is not)",
    504: "the computation took too long",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(description: str, model: type[BaseModel] | None = None) -> dict[str, Any]:
    content = {"application/json": {"schema": _ref(model)}} if model is not None else {}
    return {"description": description, **({"content": content} if content else {})}


def _errors(*statuses: int, body: type[BaseModel] = bodies.Error) -> dict[str, Any]:
    return {str(s): _json(_REASONS[s], body) for s in statuses}


def _get(summary: str, model: type[BaseModel] | None, *statuses: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": _json(summary, model), **_errors(*statuses)}}}


def _post(summary: str, request: dict[str, Any], responses: dict[str, Any]) -> dict[str, Any]:
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": request}, "responses": responses}}


def _stream(description: str, answer: type[BaseModel], event: type[BaseModel]) -> dict[str, Any]:
    """A 200 that is JSON, or Server-Sent Events when the request sets ``stream``: each ``data:``
    line one ``event`` (``x-event``), then ``data: [DONE]``."""
    events = {"schema": {"type": "string"}, "x-event": _ref(event)}
    content = {"application/json": {"schema": _ref(answer)}, "text/event-stream": events}
    return {"description": description + " (text/event-stream when stream is true)", "content": content}


def document(title: str, version: str, paths: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """An OpenAPI 3.1 document of ``paths``, with the schemas of every model they name;
    ``prefix``: the route prefix it is under."""
    used = [_MODELS[name] for name in sorted(_refs(paths))]
    _, schemas = models_json_schema([(m, "validation") for m in used], ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "servers": [{"url": prefix or "/"}],
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {})},
    }


def _refs(value: Any) -> set[str]:
    """The model names ``value`` refers to (``$ref``), at any depth."""
    if isinstance(value, dict):
        found = {value["$ref"].rsplit("/", 1)[-1]} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value))
    return set()


def scoring_paths(generate: bool = False) -> dict[str, Any]:
    """MLflow's scoring protocol (``/invocations``, ``/ping``, ``/health``, ``/version``), and
    ``/generate`` plus the OpenAI routes for a causal LM with the batching engine (either backend)."""
    request = {
        "application/json": {"schema": _ref(bodies.ScoringInput)},
        "text/csv": {"schema": {"type": "string", "description": "a header row, then one line per row"}},
    }
    paths: dict[str, Any] = {
        "/invocations": _post(
            "score rows with the model (the protocol of `mlflow models serve`)",
            request,
            {"200": _json("the model's predictions", bodies.Predictions), **_errors(400, 408, 413, 415, 500, 503, 504)},
        ),
        "/ping": _get("200 when ready", bodies.Health, 503),
        "/health": _get("readiness (and, on DeepSpeed, every rank's state)", bodies.Health, 503),
        "/version": _get("the model and version served", bodies.Version),
    }
    if generate:
        answer = _stream("generated text or token ids", bodies.Generated, bodies.GenerateEvent)
        paths["/generate"] = _post(
            "generation from text prompts or token ids (greedy unless a temperature is given)",
            {"application/json": {"schema": _ref(protocol.GenerateRequest)}},
            {"200": answer, **_errors(400, 408, 413, 500, 503, 504)},
        )
        paths.update(openai_paths())
    return paths


def openai_paths() -> dict[str, Any]:
    """The OpenAI-compatible routes (serving/openai_api.py), errors in OpenAI's shape."""
    errors = _errors(400, 404, 408, 413, 500, 503, 504, body=bodies.OpenAIError)

    def post(summary: str, request: type[BaseModel], answer: type[BaseModel], chunk: type[BaseModel]) -> Any:
        body = {"application/json": {"schema": _ref(request)}}
        return _post(summary, body, {"200": _stream(summary, answer, chunk), **errors})

    return {
        "/v1/completions": post(
            "an OpenAI completion", protocol.CompletionRequest, bodies.Completion, bodies.CompletionChunk
        ),
        "/v1/chat/completions": post(
            "an OpenAI chat completion, through the model's chat template",
            protocol.ChatRequest,
            bodies.ChatCompletion,
            bodies.ChatCompletionChunk,
        ),
        "/v1/models": _get("the model served, as OpenAI lists models", bodies.ModelList),
    }


def webhook_paths() -> dict[str, Any]:
    """The receiver: MLflow's signed webhook deliveries, and its health."""
    headers = [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
        for name in ("X-MLflow-Delivery-Id", "X-MLflow-Timestamp", "X-MLflow-Signature")
    ]
    responses = {
        "200": _json("ignored (another event, alias or model, or a replay)", bodies.WebhookAnswer),
        "202": _json("a promotion, announced as a Prefect event", bodies.WebhookAnswer),
        **_errors(400, 401, 408, 413, 500, 502),
    }
    webhook = _post(
        "an MLflow webhook delivery (HMAC-signed)",
        {"application/json": {"schema": _ref(bodies.WebhookDelivery)}},
        responses,
    )
    webhook["post"]["parameters"] = headers
    return {"/webhook": webhook, "/health": _get("200 while the receiver runs", bodies.Status)}
