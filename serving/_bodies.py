"""The bodies nodewise answers with (and the scoring and webhook bodies it takes), as pydantic
models: what ``serving/openapi.py`` generates the documents from. The requests the LLM routes
validate are in ``serving/protocol.py``.

MLflow's scoring inputs are documented here, not parsed: ``serving/_protocol.py`` keeps their
strict parser (depth, duplicate keys, UTF-8, Content-Length, dtypes; 400/413/415).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

FinishReason = Literal["stop", "length", "abort", "error"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors -----------------------------------------------------------------------------------


class Error(_Body):
    """nodewise's one error body (MLflow's scoring server's shape)."""

    error_code: str = Field(description="BAD_REQUEST, PAYLOAD_TOO_LARGE, NOT_READY, INTERNAL_ERROR, ...")
    message: str = Field(description="what was wrong, the value, what to do (a 500: a request id in the log)")


class OpenAIErrorDetail(_Body):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, server_error, ...")
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: str | None = Field(None, description="nodewise's error_code, lower case")


class OpenAIError(_Body):
    """The OpenAI routes' error body (the ``openai`` client raises the class it would against OpenAI)."""

    error: OpenAIErrorDetail


# -- MLflow's scoring protocol ----------------------------------------------------------------


class DataframeSplit(_Body):
    columns: list[Any] | None = Field(None, description="column names")
    index: list[Any] | None = Field(None, description="row labels")
    data: list[Any] = Field(description="one list of values per row")


class SplitInput(_Body):
    dataframe_split: DataframeSplit = Field(description="pandas' split orientation")
    params: dict[str, Any] | None = None


class RecordsInput(_Body):
    dataframe_records: list[dict[str, Any]] = Field(description="one object per row")
    params: dict[str, Any] | None = None


class InstancesInput(_Body):
    instances: Any = Field(description="a rectangular array, or an object of named arrays")
    params: dict[str, Any] | None = None


class InputsInput(_Body):
    inputs: Any = Field(description="a rectangular array, or an object of named arrays")
    params: dict[str, Any] | None = None


class ScoringInput(RootModel[SplitInput | RecordsInput | InstancesInput | InputsInput]):
    """``POST /invocations`` as JSON: exactly one of the four keys ``mlflow models serve`` takes
    (or CSV with a header row as ``text/csv``). At most 64 levels of nesting, no key twice, UTF-8."""


class Predictions(_Body):
    """The scoring answer: the model's output, as ``mlflow models serve`` gives it."""

    predictions: Any = Field(description="a list (one entry per row), or an object of named outputs")


# -- health and version -----------------------------------------------------------------------


class Health(BaseModel):
    """``/health`` and ``/ping`` with a body (an LLM replica, rank 0). A scoring replica on Ray Serve
    answers 200 with an empty body when its model is loaded."""

    model_config = ConfigDict(extra="allow")
    ready: bool
    problems: list[str] = Field([], description="why not ready (rank 0: per rank)")
    world_size: int | None = Field(None, description="rank 0: how many ranks")
    ranks: list[dict[str, Any]] | None = Field(None, description="rank 0: each rank's heartbeat")
    engine: dict[str, int] | None = Field(None, description="the batch: running, waiting, finished by reason")
    tokens_in_flight: int | None = Field(None, description="an LLM replica: the tokens its engine holds at once")
    uptime_s: float | None = None


class Version(_Body):
    model: str
    version: str
    backend: str | None = Field(None, description='rank 0: "deepspeed_mpi"')
    tp_size: int | None = Field(None, description="rank 0: the tensor-parallel ranks")


# -- the LLM routes ---------------------------------------------------------------------------


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Body):
    index: int
    text: str
    finish_reason: FinishReason | None = Field(description="null until the last chunk of a stream")
    logprobs: None = None


class Completion(_Body):
    """``POST /v1/completions``: one choice per prompt."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Body):
    """One Server-Sent Event of a streamed completion (the last may carry only ``usage``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Body):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Body):
    """``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Body):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: None = None


class ChatCompletionChunk(_Body):
    """One Server-Sent Event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = Field(None, description="the model's context, in tokens")


class ModelList(_Body):
    """``GET /v1/models``: the one model this endpoint serves."""

    object: Literal["list"]
    data: list[ModelCard]


class Generated(_Body):
    """``POST /generate``: ``generated_text`` for text prompts (each prompt followed by its new
    text), ``output_ids`` for ``input_ids`` (each sequence's new tokens)."""

    generated_text: list[str] | None = None
    output_ids: list[list[int]] | None = None


class GenerateEvent(_Body):
    """One Server-Sent Event of a streamed ``/generate``: a token (with the text it adds), then
    the finish reason and usage, then ``data: [DONE]``; or an error."""

    token_id: int | None = None
    text: str | None = None
    finish_reason: Literal["stop", "length", "cancelled", "error"] | None = None
    usage: dict[str, int] | None = None
    error: dict[str, str] | None = None


# -- the webhook receiver ---------------------------------------------------------------------


class RegistryEntity(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = Field(None, description="the registered model")
    alias: str | None = Field(None, description="the alias set (a promotion)")


class WebhookDelivery(BaseModel):
    """An MLflow webhook delivery (HMAC-signed; the headers carry id, timestamp and signature)."""

    model_config = ConfigDict(extra="allow")
    entity: str = Field(description='e.g. "model_version_alias"')
    action: str = Field(description='e.g. "created"')
    data: RegistryEntity


class WebhookAnswer(BaseModel):
    """200: ``{"ignored": why}``; 202: ``{"event": id, "events": [id, ...]}`` (Prefect events)."""

    ignored: str | None = None
    event: str | None = None
    events: list[str] | None = None


class Status(_Body):
    status: Literal["ok"]
