"""The OpenAI chat-completions wire format that :mod:`lit_lora.serve.server` speaks: request bodies (validated by
pydantic, so a malformed body is a 422 before anything runs), response and stream-chunk bodies, and errors
in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``), which the official clients turn
into their typed exceptions (``BadRequestError``, ``AuthenticationError``, ``NotFoundError``...).

Fields a client may send that lit-lora does not use (``frequency_penalty``, ``user``, ``tools``...) are
accepted and ignored, as OpenAI-compatible servers do, except where ignoring them would change the answer
silently (``n`` > 1, ``logprobs``): those are refused with a 400.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error the client caused (or a server state it should know about), sent as OpenAI's JSON."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.code)


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``. ``temperature`` None: the server's default (greedy unless started
    with another); ``max_tokens`` / ``max_completion_tokens`` None: the server's cap."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logprobs: bool | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", code="invalid_stop")
        return stops

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "n > 1 is not supported: send one request per answer", code="unsupported")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported by lit-lora serve", code="unsupported")


class AdapterRequest(BaseModel):
    """``POST /v1/adapters``: serve the adapter in ``path`` (a folder on the server) as ``name``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(cid: str, model: str, text: str, reason: str, prompt_tokens: int, tokens: int) -> dict:
    """The body of a non-streaming answer."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, tokens),
    }


def chunk(cid: str, model: str, delta: dict, reason: str | None = None, usage_: dict | None = None) -> str:
    """One server-sent event of a streamed answer. The usage chunk (``stream_options.include_usage``) has
    no choices, as OpenAI sends it."""
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage_ else [{"index": 0, "delta": delta, "finish_reason": reason}],
    }
    if usage_:
        body["usage"] = usage_
    return sse(body)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"
