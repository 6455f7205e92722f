"""The requests nodewise's LLM routes take, defined once as pydantic models: the OpenAI
completion and chat requests (``/v1/completions``, ``/v1/chat/completions``) and ``/generate``.

The ranges of the sampling fields live here, in one set of constrained types (``Temperature``,
``TopP``, ``Seed``, ``Stops``, ...): the request models use them, and so does ``SamplingParams``,
what the engine runs (``serving/engine.py`` re-exports it), so the OpenAPI documents
(``serving/openapi.py``, generated from these models), the 400s and the engine cannot disagree.
Each request converts itself to ``SamplingParams`` in one method, ``sampling(max_tokens)``.

A body is parsed by ``serving/errors.py``'s strict JSON reader first (depth, duplicate keys,
UTF-8), then validated here: ``validate`` turns pydantic's errors into one ``InvalidParameter``
(a 400 whose ``param`` is the field, OpenAI's shape) naming the field, the value and what to send.
MLflow's scoring inputs are not parsed here (``serving/_protocol.py`` keeps their strict parser).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.errors import BadRequest

GREEDY_BELOW = 1e-5  # a temperature below this is greedy (vLLM's _SAMPLING_EPS)
MAX_STOPS = 4

# What each field takes, in words: the schema's descriptions and the 400's "use ..." both say it.
ALLOWED = {
    "max_tokens": "an integer >= 1",
    "max_new_tokens": "an integer >= 1",
    "max_completion_tokens": "an integer >= 1",
    "temperature": "a number from 0 (greedy) to 100",
    "top_p": "a number in (0, 1]",
    "top_k": "an integer >= 0 (0: off)",
    "seed": "an integer from 0 to 2**63 - 1",
    "stop": f"up to {MAX_STOPS} non-empty strings",
    "stream": "true or false",
    "stream_options": '{"include_usage": true or false}',
    "model": "the name of the model this endpoint serves (GET /v1/models)",
    "prompt": "a string, a non-empty list of strings or of token ids, or a list of token-id lists",
    "messages": 'a non-empty list of {"role": "...", "content": "text" or [{"type": "text", "text": "..."}]}',
    "input_ids": "a non-empty list of non-empty lists of token ids (integers >= 0)",
}


def _field(name: str, meaning: str = "", **constraints: Any) -> Any:
    """A ``Field`` whose description says what it means and what it takes (``ALLOWED``)."""
    return Field(description=f"{meaning}{'; ' if meaning else ''}{ALLOWED[name]}", **constraints)


def _integral(value: Any) -> Any:
    """A JSON number with no fraction (``2.0``) is an integer, as JSON Schema counts it."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


Whole = BeforeValidator(_integral)  # on the requests' integers; the engine's own check stays strict
NewTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0)]
OpenAITopK = Annotated[int, Field(ge=-1)]  # vLLM's -1 is "off", as 0 is here
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
StopString = Annotated[str, Field(min_length=1)]
Stops = Annotated[list[StopString], Field(max_length=MAX_STOPS)]
TokenId = Annotated[Annotated[int, Field(ge=0)], Whole]
JsonNewTokens, JsonTopK, JsonSeed = Annotated[NewTokens, Whole], Annotated[OpenAITopK, Whole], Annotated[Seed, Whole]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
_GREEDY = f"0 (the default) and anything below {GREEDY_BELOW:g} are greedy"


def is_sampled(temperature: float | None, top_k: int | None) -> bool:
    """Whether a request draws its tokens at random (so only a seed makes it repeatable): a
    temperature of ``GREEDY_BELOW`` or more (none sent is 0, greedy) and a ``top_k`` other than 1."""
    return (temperature or 0) >= GREEDY_BELOW and top_k != 1


def draw_seed() -> int:
    """The seed a sampled request without one gets (within ``Seed``'s range)."""
    return random.getrandbits(62)


class InvalidParameter(BadRequest):
    """A 400 that names the request field at fault (OpenAI's ``param``)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class SamplingError(ValueError):
    """A sampling parameter is out of range (the servers answer 400)."""


class _Ranges(BaseModel):
    """The engine's sampling fields, checked: ``SamplingParams`` validates itself with this."""

    model_config = ConfigDict(strict=True, extra="forbid")
    max_tokens: NewTokens
    temperature: Temperature
    top_p: TopP
    top_k: TopK
    seed: Seed | None
    stop: Stops


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen (what the engine runs). ``temperature`` 0 (or anything
    below ``GREEDY_BELOW``) is greedy, the default. Out of range: ``SamplingError`` naming the field."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fields = {**self.__dict__, "stop": list(self.stop) if isinstance(self.stop, tuple | list) else self.stop}
        try:
            _Ranges.model_validate(fields)
        except ValidationError as e:
            name = str(e.errors()[0]["loc"][0])
            raise SamplingError(f"{name}={fields[name]!r} is out of range; use {ALLOWED[name]}") from None

    @property
    def greedy(self) -> bool:
        return not is_sampled(self.temperature, self.top_k)


# -- requests ---------------------------------------------------------------------------------


class _Request(BaseModel):
    """Strict JSON types (no "1" for 1, no 1.0 for an integer, no 1 for true); fields this API does
    not know are ignored, as vLLM ignores them."""

    model_config = ConfigDict(strict=True, extra="ignore")


class _Sampled(_Request):
    """The sampling fields every LLM request takes, and their one conversion to ``SamplingParams``."""

    temperature: Temperature | None = _field("temperature", _GREEDY, default=None)
    top_p: TopP | None = _field("top_p", "nucleus sampling: the smallest set of tokens this likely", default=None)
    top_k: JsonTopK | None = Field(None, description="sample from the k likeliest tokens; 0 or -1: off")
    seed: JsonSeed | None = _field(
        "seed", "the same seed gives the same tokens; drawn for you if sampled", default=None
    )
    stop: StopString | Stops | None = _field("stop", "the text ends before the first one", default=None)
    stream: bool | None = _field("stream", "tokens as Server-Sent Events while they come", default=False)

    @model_validator(mode="after")
    def _draw_seed(self) -> Any:
        """A sampled request without a seed gets one here, so every rank of a cluster draws alike."""
        if is_sampled(self.temperature, self.top_k) and self.seed is None:
            self.seed = draw_seed()
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_fields(self) -> dict[str, Any]:
        """``SamplingParams``' fields but ``max_tokens``, as they cross to other ranks (``messages.Add``)."""
        fields: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        fields["top_k"] = 0 if self.top_k == -1 else self.top_k
        fields = {k: v for k, v in fields.items() if v is not None}
        return {**fields, "stop": self.stops} if self.stops else fields

    def sampling(self, max_tokens: int) -> SamplingParams:
        """What the engine runs for this request: the one conversion of a request to ``SamplingParams``."""
        try:
            return SamplingParams(max_tokens=max_tokens, **self.sampling_fields())
        except SamplingError as e:  # max_tokens, the one field not checked on the way in
            raise InvalidParameter(str(e).split("=")[0], str(e)) from e


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="a last chunk with the usage counts")


def _unsupported(*allowed: Any) -> Any:
    """A field the engine cannot honour: left out, or one of ``allowed`` (what asks for nothing).
    The document says so (``enum``), so a client generated from it sends only what is taken."""
    values = [v for i, v in enumerate(allowed) if v not in allowed[:i]]  # 0 and 0.0 are one JSON value
    return Field(
        None,
        description=f"not supported by nodewise: leave it out (or send {allowed[0]!r})",
        json_schema_extra={"enum": [*values, None]},
    )


class _OpenAIRequest(_Sampled):
    """What both OpenAI routes take. What the engine cannot do is refused by name, not ignored."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "n": (1,),
        "best_of": (1,),
        "echo": (False,),
        "logprobs": (False,),
        "top_logprobs": (0,),
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "logit_bias": ({},),
        "suffix": ("",),
        "tools": ([],),
        "functions": ([],),
        "tool_choice": ("none", "auto"),
        "response_format": ({"type": "text"},),
    }
    model: str | None = _field("model", default=None)
    max_tokens: JsonNewTokens | None = _field("max_tokens", "at most this many new tokens", default=None)
    stream_options: StreamOptions | None = _field("stream_options", default=None)
    n: Any = _unsupported(1)
    best_of: Any = _unsupported(1)
    echo: Any = _unsupported(False)
    logprobs: Any = _unsupported(False)
    top_logprobs: Any = _unsupported(0)
    presence_penalty: Any = _unsupported(0)
    frequency_penalty: Any = _unsupported(0)
    logit_bias: Any = _unsupported({})
    suffix: Any = _unsupported("")
    tools: Any = _unsupported([])
    functions: Any = _unsupported([])
    tool_choice: Any = _unsupported("none")
    response_format: Any = _unsupported({"type": "text"})

    @field_validator(*UNSUPPORTED, mode="after")
    @classmethod
    def _not_asked_for(cls, value: Any, info: Any) -> Any:
        if value is not None and value not in cls.UNSUPPORTED[info.field_name]:
            raise ValueError(f"{info.field_name}={value!r} is not supported by nodewise; leave it out")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions``."""

    prompt: str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1)] = _field(
        "prompt", "one prompt or several (one choice each)"
    )

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        if isinstance(self.prompt, str) or all(isinstance(t, int) for t in self.prompt):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class TextPart(_Request):
    """One part of a message's content; only text parts (a model of text only)."""

    type: Literal["text"] = Field(description='"text" (images and audio are not taken)')
    text: str


class ChatMessage(_Request):
    role: str = Field(description="system, user, assistant, ... (as the model's chat template names them)")
    content: str | list[TextPart] = Field(description="the text, or a list of text parts (joined)")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_OpenAIRequest):
    """``POST /v1/chat/completions``: the conversation through the model's own chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)] = _field("messages")
    max_completion_tokens: JsonNewTokens | None = _field(
        "max_completion_tokens", "at most this many new tokens (OpenAI's newer name of max_tokens)", default=None
    )


class GenerateRequest(_Sampled):
    """``POST /generate`` (DeepSpeed's rank 0): text prompts or token ids, one of the two."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description='one text or a non-empty list of texts (answer: "generated_text")'
    )
    input_ids: Annotated[list[TokenIds], Field(min_length=1)] | None = _field(
        "input_ids", 'instead of prompt (answer: "output_ids")', default=None
    )
    max_new_tokens: JsonNewTokens | None = _field("max_new_tokens", "default: the deployment's", default=None)

    @model_validator(mode="after")
    def _one_input(self) -> Any:
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError('send {"prompt": "text" or ["text", ...]} or {"input_ids": [[id, ...], ...]}, one of them')
        return self

    @property
    def texts(self) -> list[str] | None:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def new_tokens(self, default: int, limit: int) -> int:
        """``max_new_tokens`` (``default`` when not sent); a 400 naming it when over ``limit``."""
        value = default if self.max_new_tokens is None else self.max_new_tokens
        if value > limit:
            raise InvalidParameter(
                "max_new_tokens", f"max_new_tokens={value} is over this deployment's limit of {limit}"
            )
        return value


Parsed = TypeVar("Parsed", bound=BaseModel)


def validate(model: type[Parsed], payload: Any) -> Parsed:
    """``payload`` (decoded JSON) as ``model``; an ``InvalidParameter`` naming the first bad field,
    its value and what to send instead."""
    if not isinstance(payload, dict):
        raise BadRequest(f"the body must be a JSON object; got {type(payload).__name__}")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise invalid(e, payload) from None


def invalid(error: ValidationError, payload: dict[str, Any]) -> InvalidParameter:
    """One line for pydantic's first error: ``name=value is out of range; use ...``."""
    first = error.errors(include_url=False)[0]
    loc = first["loc"]
    if not loc:  # a rule over several fields (a model validator): its own words
        return InvalidParameter(None, first["msg"].removeprefix("Value error, "))
    param = str(loc[0])
    if first["type"] == "value_error":
        return InvalidParameter(param, first["msg"].removeprefix("Value error, "))
    if first["type"] == "missing" and len(loc) == 1:
        return InvalidParameter(param, f'"{param}" is required: {ALLOWED.get(param, first["msg"])}')
    name = param + (f"[{loc[1]}]" if len(loc) > 1 and isinstance(loc[1], int) else "")
    value = payload.get(param) if name == param else _at(payload, loc[:2])
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return InvalidParameter(param, f"{name}={shown} is out of range; use {ALLOWED.get(param, first['msg'].lower())}")


def _at(payload: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            payload = payload[part]
        except (KeyError, IndexError, TypeError):
            return None
    return payload


def parse_generate(body: bytes) -> GenerateRequest:
    """A ``/generate`` body (bytes) as a ``GenerateRequest``: strict JSON, then the model; a 400
    naming the field otherwise. The deployment's limits (``new_tokens``, the vocabulary, the
    context) are the caller's to check."""
    from serving.errors import decode_json

    return validate(GenerateRequest, decode_json(body))
