"""The LLM API's requests and answers, typed: what its hand-written parsers accept (``gateway/parsing.py``,
``gateway/responses/parsing.py``), as pydantic models, for the OpenAPI document.

The parsers stay hand-written (they run on every request, and read each body once); these models are
their description, kept honest by the API tests: Schemathesis sends the gateway bodies these schemas
allow (which must not be refused with a 400) and bodies they forbid (which must be). The parsers' limits
are imported from them, not copied. Every body may carry fields not listed here: the gateway forwards
them to the model server (a server's own extensions), so the objects are open (``additionalProperties``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, WithJsonSchema

from quotagate.gateway.parsing import MAX_CHOICES, MAX_EMBEDDING_INPUTS, MAX_TOKENS_CEILING
from quotagate.openapi.spec import MODEL_ID, Operation

_OPEN = ConfigDict(extra="allow")
Number = StrictInt | StrictFloat
Length = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CEILING)]
# llama.cpp's n_predict and Ollama's num_predict say "no limit" with a negative number.
SignedLength = Annotated[StrictInt, Field(le=-1)] | Length
Choices = Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)]

ChatModel = Annotated[StrictStr, Field(min_length=1, description="The id of a chat model (GET /v1/models)",
                                       json_schema_extra={MODEL_ID: "chat"})]
EmbeddingModel = Annotated[StrictStr, Field(min_length=1, description="The id of an embedding model",
                                            json_schema_extra={MODEL_ID: "embedding"})]
RerankModel = Annotated[StrictStr, Field(min_length=1, description="The id of a rerank model",
                                         json_schema_extra={MODEL_ID: "rerank"})]
# An integer the parsers read as one: JSON's reader (orjson) reads a larger one as a float.
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]
Tokens = Annotated[list[Int64], Field(min_length=1)]


class _Open(BaseModel):
    model_config = _OPEN


class Part(_Open):
    """A content part (text, image_url, input_audio, ...): its fields depend on its type."""

    type: StrictStr


Parts = list[Part]


class Message(_Open):
    role: StrictStr
    content: StrictStr | Parts | None = None


class _Sampling(_Open):
    model: ChatModel
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = Field(default=None, description="include_usage is always set "
                                                                            "upstream; the usage chunk is sent "
                                                                            "only if asked for")
    n: Choices | None = None
    best_of: Choices | None = None
    max_tokens: Length | None = None
    max_completion_tokens: Length | None = None
    max_new_tokens: Length | None = None
    n_predict: SignedLength | None = None
    num_predict: SignedLength | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    seed: Int64 | None = None
    user: StrictStr | None = None
    stop: StrictStr | list[Any] | None = None
    logit_bias: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    """OpenAI's chat completion body. Every length field a server reads (max_tokens,
    max_completion_tokens, n_predict, max_new_tokens, num_predict) is lowered to what the key's limits
    grant; min_tokens may not exceed the smallest of them."""

    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    chat_template: None = Field(default=None, description="Refused: a template of the client's own cannot be "
                                                          "counted")


Prompt = StrictStr | Annotated[list[StrictStr | Tokens], Field(min_length=1)] | Tokens


class CompletionRequest(_Sampling):
    """OpenAI's (legacy) completion body: best_of must be at least n, and the prompts times
    max(n, best_of) at most 128 sequences."""

    prompt: Prompt
    suffix: StrictStr | None = None
    echo: StrictBool | None = None
    logprobs: Int64 | None = None


class EmbeddingsRequest(_Open):
    model: EmbeddingModel
    input: StrictStr | Annotated[list[StrictStr | Tokens], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] \
        | Tokens
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1, le=65_536)] | None = None
    user: StrictStr | None = None


Document = StrictStr | Annotated[dict[str, Any], Field(min_length=1)]


class RerankRequest(_Open):
    """Cohere's and Jina's rerank body (as vLLM and llama.cpp serve it)."""

    model: RerankModel
    query: Document
    documents: Annotated[list[Document], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    top_n: Annotated[StrictInt, Field(ge=1, le=MAX_EMBEDDING_INPUTS)] | None = None
    return_documents: StrictBool | None = None
    user: StrictStr | None = None


class ScoreRequest(_Open):
    """vLLM's score body: one text_1 against every text_2, or two lists of the same length, by position."""

    model: RerankModel
    text_1: Document | Annotated[list[Document], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    text_2: Document | Annotated[list[Document], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    user: StrictStr | None = None


class InputMessage(_Open):
    type: Literal["message"] | None = None
    role: StrictStr
    content: StrictStr | Parts


class FunctionCall(_Open):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr


class FunctionCallOutput(_Open):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | Parts


class OtherItem(_Open):
    """Any other input item (reasoning, a custom tool's call or output, ...): counted whole."""

    type: Annotated[StrictStr, WithJsonSchema({"type": "string", "not": {"enum": [
        "message", "function_call", "function_call_output", "item_reference"]}})] = Field(
        description="Not item_reference: an item held on the model server cannot be counted")


class Tool(_Open):
    type: Literal["function", "custom"] = Field(description="Only tools your program runs: a built-in tool's "
                                                            "results would enter the prompt uncounted")
    name: StrictStr


class ResponsesRequest(_Open):
    """OpenAI's Responses API body, stateless: the whole conversation in ``input``."""

    model: ChatModel
    input: StrictStr | Annotated[list[InputMessage | FunctionCall | FunctionCallOutput | OtherItem],
                                 Field(min_length=1)]
    instructions: StrictStr | None = None
    stream: StrictBool | None = None
    store: Literal[False] | None = Field(default=None, description="true is refused: nothing is kept")
    background: Literal[False] | None = None
    previous_response_id: None = Field(default=None, description="Refused: send the whole conversation")
    conversation: None = Field(default=None, description="Refused: send the whole conversation")
    prompt: None = Field(default=None, description="Refused: a stored prompt cannot be counted")
    chat_template: None = None
    n: Literal[1] | None = None
    best_of: Literal[1] | None = None
    max_output_tokens: Length | None = None
    max_tokens: Length | None = None
    max_completion_tokens: Length | None = None
    max_new_tokens: Length | None = None
    n_predict: SignedLength | None = None
    num_predict: SignedLength | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    tools: list[Tool] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None
    include: list[Any] | None = None
    truncation: StrictStr | None = None
    top_logprobs: Int64 | None = None
    max_tool_calls: Int64 | None = None
    seed: Int64 | None = None


# -- answers ---------------------------------------------------------------------------------------
class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Open):
    """As the model server answered it, with the usage the key was charged."""

    object: Literal["chat.completion"]
    choices: list[dict[str, Any]]
    usage: Usage


class Completion(_Open):
    object: Literal["text_completion"]
    choices: list[dict[str, Any]]
    usage: Usage


class PromptUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Open):
    data: list[dict[str, Any]]
    usage: PromptUsage


class RerankUsage(_Open):
    total_tokens: int
    prompt_tokens: int | None = None


class RerankAnswer(_Open):
    """As the model server answered it (its usage: Jina's and vLLM's, total_tokens)."""

    results: list[dict[str, Any]]
    usage: RerankUsage


class ScoreAnswer(_Open):
    data: list[dict[str, Any]]
    usage: RerankUsage


class Response(_Open):
    object: Literal["response"]
    output: list[Any]
    usage: dict[str, Any]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    type: Literal["chat", "embedding", "rerank"]


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    code: str | None
    param: str | None


class Error(BaseModel):
    """OpenAI's error shape, with the gateway's codes."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["ok"]


LLM = "LLM API"
_GENERATION = (400, 401, 403, 404, 413, 415, 429, 502, 503, 504)
STREAMED = "text/event-stream"


def _events(what: str) -> dict[str, Any]:
    """A stream's media type: each server-sent event, as Schemathesis (and OpenAPI 3.2's itemSchema) read one."""
    return {STREAMED: {"schema": {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string", "description": "The Responses API's event type (response.created, ...)"},
        "data": {"type": "string", "description": f"{what}; an error that ends a stream early is an `Error` "
                                                  "object"}}}}}


CHUNKS = _events("A chunk object as JSON (the usage in the last one, if asked for), then `[DONE]`")

# The operation of each path of the gateway's route table (gateway/routes.py): the document is built from
# that table and fails to build if a path has none here.
OPERATIONS: dict[str, Operation] = {
    "/v1/chat/completions": Operation(
        "Create a chat completion", LLM, body=ChatCompletionRequest, answer=ChatCompletion, errors=_GENERATION,
        extra_media=CHUNKS, description="OpenAI's chat completions; with stream: true, server-sent events."),
    "/v1/completions": Operation(
        "Create a completion", LLM, body=CompletionRequest, answer=Completion, errors=_GENERATION,
        extra_media=CHUNKS),
    "/v1/embeddings": Operation("Create embeddings", LLM, body=EmbeddingsRequest, answer=EmbeddingList,
                                errors=_GENERATION),
    "/v1/rerank": Operation("Rerank documents", LLM, body=RerankRequest, answer=RerankAnswer, errors=_GENERATION),
    "/v1/score": Operation("Score text pairs", LLM, body=ScoreRequest, answer=ScoreAnswer, errors=_GENERATION),
    "/v1/responses": Operation(
        "Create a response", LLM, body=ResponsesRequest, answer=Response, errors=_GENERATION,
        extra_media=_events("The event's object as JSON, ending with response.completed (or incomplete)"),
        description="OpenAI's Responses API, stateless (store: false); with stream: true, its typed server-sent "
                    "events."),
    "/v1/models": Operation("List the models this key may use", LLM, answer=ModelList, errors=(401, 403)),
    "/v1/models/{model}": Operation("Get a model", LLM, answer=Model, errors=(401, 403, 404)),
}
HEALTH_OPERATION = Operation("Health check", "Instance", answer=Health, public=True)
OPENAPI_OPERATION = Operation("This document", "Instance", answer_schema={"type": "object"}, public=True)
