"""Serve the base model and any number of adapters through the OpenAI API:
``lit-lora serve 'adapters={json:runs/a/adapter,sentiment:runs/b/adapter}'`` (quoted: the
shell would expand ``{a,b}``).

One base model is loaded once (``model=`` / ``quant=`` as in training, QLoRA bases included); each adapter
is attached to it as a named PEFT adapter and served under its name, the base under ``base_name``. A
request's ``model`` picks which. Each adapter's prompts are rendered with the ``rendering.json`` saved
beside it, exactly as in training and in :mod:`lit_lora.apps.generate`, and generation stops at its EOS token.
Requests are decoded together, whatever adapter they ask for (:mod:`lit_lora.serve.engine`).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (streaming or not), ``POST /v1/adapters``
(load another adapter folder at run time; needs ``api_key``), ``GET /health``. With ``api_key`` set (or
``LIT_LORA_API_KEY``), every ``/v1`` endpoint wants ``Authorization: Bearer <key>``.

SIGTERM or Ctrl-C: stop accepting connections, finish the requests in flight (at most ``grace_period_s``
seconds), exit 0.

Why FastAPI + uvicorn rather than LitServe: LitServe runs the model in worker processes that the HTTP
process reaches only through its predict queue, so loading an adapter into the running model
(``POST /v1/adapters``), listing adapters with their rank, and freeing a disconnected stream's batch row at
the next decoding step would each need a side channel into the worker; its OpenAI spec also fixes the
batching unit to whole requests, while mixed-adapter continuous batching needs the decoding loop to own
the batch. Here the loop is one thread in the server process, and the HTTP side only queues requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import DictConfig
from starlette.exceptions import HTTPException

from lit_lora.config.apps import ServeConfig, typed
from lit_lora.data.rendering import Rendering, prompt_ids
from lit_lora.errors import UserError
from lit_lora.models.adapters import check_adapter_folder, load_named_adapter, rendering_for, tokenizer_for
from lit_lora.serve.engine import Delta, Engine, EngineClosed, Failed, Finished, Job
from lit_lora.serve.protocol import (
    AdapterRequest,
    ApiError,
    ChatRequest,
    chunk,
    completion,
    completion_id,
    error_body,
    sse,
    usage,
)

log = logging.getLogger("lit_lora.serve")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass
class Served:
    """One name the server answers to: the base (``adapter`` None) or a PEFT adapter on it."""

    name: str
    adapter: str | None  # the PEFT adapter name inside the model (adapter0, adapter1...)
    folder: Path | None
    rank: int | None
    tokenizer: object
    rendering: Rendering
    created: int

    def card(self, base_name: str, source: str) -> dict:
        """The entry of ``GET /v1/models``."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "lit-lora",
            "root": str(self.folder) if self.folder else source,
            "parent": base_name if self.adapter else None,
            "base_model": source,
            "lora_rank": self.rank,
        }


def adapter_table(value) -> dict[str, str]:
    """``adapters=`` as ``{name: folder}``. Accepted: a mapping ``{name: folder}``; a list whose items are
    ``name=folder`` or a bare folder (named after its run folder, ``runs/a/adapter`` -> ``a``)."""
    if value is None:
        return {}
    if hasattr(value, "items"):
        table = {str(k): str(v) for k, v in value.items()}
    elif isinstance(value, list | tuple) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        table = {}
        for item in value:
            name, sep, folder = str(item).partition("=")
            if not sep:
                path = Path(name)
                name, folder = (path.parent.name if path.name == "adapter" else path.name), str(path)
            if name in table:
                raise UserError(f"adapters: the name {name!r} is given twice; name them: {{a:path,b:path}}")
            table[name] = folder
    else:
        raise UserError(f"adapters= takes {{name:folder,...}} or [folder,...], got {value!r}")
    for name in table:
        if not NAME.match(name):
            raise UserError(f"adapters: {name!r} is not a usable model name (letters, digits, ._:/-)")
    return table


def check_fits(model, folder: Path, tokenizer) -> None:
    """Refuse, before the model is touched, an adapter whose LoRA matrices do not match this base's layers
    (another architecture or size) or whose tokenizer has more tokens than the base's embeddings."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open has no iterator)
            match = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if not match:
                continue
            path, side = match.groups()
            layer = modules.get(path) or modules.get(f"base_model.model.{path}")
            shape = tuple(weights.get_slice(key).get_shape())
            if layer is None:
                raise UserError(f"the adapter in {folder} does not fit this base: it has no layer {path}")
            layer = getattr(layer, "base_layer", layer)
            expected = (
                getattr(layer, "in_features", None) if side == "A" else getattr(layer, "out_features", None)
            )
            got = shape[1] if side == "A" else shape[0]
            if expected is not None and got != expected:
                raise UserError(
                    f"the adapter in {folder} does not fit this base: {path} is {expected} wide here, "
                    f"{got} in the adapter (trained on another model?)"
                )
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise UserError(f"the adapter in {folder} has {len(tokenizer)} tokens; this base embeds {vocab}")


class Catalog:
    """The base, its adapters, and the model holding them. Adapters are added on the engine thread
    (:meth:`add`), so the model never changes under a running step."""

    def __init__(self, model, tokenizer, source: str, base_name: str):
        self.model, self.source, self.base_name = model, source, base_name
        self.entries = {
            base_name: Served(
                base_name,
                None,
                None,
                None,
                tokenizer,
                rendering_for(Path(source), tokenizer),
                int(time.time()),
            )
        }
        config = getattr(model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )

    def add(self, name: str, folder: str | Path) -> Served:
        """Attach the adapter in ``folder`` as ``name``; :class:`UserError` if it does not fit."""
        from peft import PeftModel

        if name in self.entries:
            raise UserError(f"a model named {name!r} is already served")
        path = check_adapter_folder(folder)
        tokenizer = tokenizer_for(path, self.entries[self.base_name].tokenizer)
        check_fits(self.model, path, tokenizer)
        adapter = f"adapter{len(self.entries) - 1}"
        try:
            if isinstance(self.model, PeftModel):
                load_named_adapter(self.model, path, adapter)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=adapter)
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(
                f"the adapter in {folder} does not fit this base: {str(err).splitlines()[0]}"
            ) from err
        self.model.eval()
        rank = json.loads((path / "adapter_config.json").read_text()).get("r")
        served = Served(
            name, adapter, path.resolve(), rank, tokenizer, rendering_for(path, tokenizer), int(time.time())
        )
        self.entries[name] = served
        return served


def load(cfg: ServeConfig) -> Catalog:
    """The base of ``cfg`` with every adapter of ``cfg.adapters`` attached."""
    from lit_lora.models.builder import build_model

    table = adapter_table(cfg.adapters)
    if cfg.base_name in table:
        raise UserError(f"adapters: {cfg.base_name!r} is the base's name (base_name=); rename the adapter")
    for folder in table.values():  # before the base loads: a wrong path fails in a second
        check_adapter_folder(folder)
    built = build_model(cfg)
    catalog = Catalog(built.model, built.tokenizer, built.source, cfg.base_name)
    for name, folder in table.items():
        catalog.add(name, folder)
    return catalog


def create_app(cfg: ServeConfig, catalog: Catalog, engine: Engine):
    """The FastAPI application: routes, API-key check, OpenAI-shaped errors."""
    state = {"stopping": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        state["stopping"] = True
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title="lit-lora", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lit_lora = state

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, err: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()]
        return JSONResponse(
            error_body("; ".join(problems) or "malformed request body", "invalid_request_error"),
            status_code=422,
        )

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal(request, err: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), 500)

    def authorized(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")

    @app.get("/health")
    async def health():
        body = {
            "status": "stopping" if state["stopping"] else "ok",
            "models": list(catalog.entries),
            **engine.stats(),
        }
        return JSONResponse(body, status_code=503 if state["stopping"] else 200)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        cards = [s.card(catalog.base_name, catalog.source) for s in catalog.entries.values()]
        return {"object": "list", "data": cards}

    @app.post("/v1/adapters", dependencies=[Depends(authorized)])
    async def add_adapter(body: AdapterRequest):
        if cfg.api_key is None:
            raise ApiError(
                403, "loading adapters at run time needs a server started with api_key=", code="forbidden"
            )
        if not NAME.match(body.name):
            raise ApiError(400, f"{body.name!r} is not a usable model name (letters, digits, ._:/-)")
        if body.name in catalog.entries:
            raise ApiError(409, f"a model named {body.name!r} is already served", code="conflict")

        def attach():
            served = catalog.add(body.name, body.path)
            engine.model = catalog.model
            return served

        try:
            served = await asyncio.wrap_future(engine.call(attach))
        except UserError as err:
            raise ApiError(400, str(err), code="adapter_does_not_fit") from err
        except EngineClosed as err:
            raise ApiError(503, str(err), "server_error", "shutting_down") from err
        return served.card(catalog.base_name, catalog.source)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest):
        served = catalog.entries.get(body.model)
        if served is None:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist; served: {', '.join(catalog.entries)}",
                code="model_not_found",
            )
        body.check_supported()
        limit = body.max_completion_tokens or body.max_tokens or cfg.max_new_tokens
        if limit > cfg.max_new_tokens:
            raise ApiError(400, f"max_tokens={limit} is over this server's cap ({cfg.max_new_tokens})")
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = prompt_ids(served.tokenizer, served.rendering, messages)
        except Exception as err:  # the chat template refuses this conversation (roles out of order...)
            raise ApiError(400, f"the chat template cannot render these messages: {err}") from err
        if catalog.context and len(ids) + limit > catalog.context:
            raise ApiError(
                400,
                f"this model's context is {catalog.context} tokens; the messages take {len(ids)} and "
                f"max_tokens {limit}: shorten the messages or lower max_tokens",
                code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(
            adapter=served.adapter,
            prompt=ids,
            max_tokens=limit,
            eos_id=served.tokenizer.eos_token_id,
            decode=lambda tokens: served.tokenizer.decode(tokens, skip_special_tokens=True),
            sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            temperature=cfg.temperature if body.temperature is None else body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stops(),
            stream=body.stream,
        )
        try:
            engine.submit(job)
        except EngineClosed as err:
            raise ApiError(503, str(err), "server_error", "shutting_down") from err
        cid = completion_id()
        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, events, cid, body.model, len(ids), with_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            while True:
                event = await events.get()
                if isinstance(event, Finished):
                    return completion(
                        cid, body.model, event.text, event.reason, len(ids), event.completion_tokens
                    )
                if isinstance(event, Failed):
                    raise ApiError(500, event.message, "server_error")
        finally:
            if not job.done:  # the client went away: free the row
                job.cancelled = True

    return app


async def _stream(
    job: Job, events: asyncio.Queue, cid: str, model: str, prompt_tokens: int, with_usage: bool
):
    """The server-sent events of one streamed answer; a client that goes away cancels the job."""
    try:
        yield chunk(cid, model, {"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield chunk(cid, model, {"content": event.text})
            elif isinstance(event, Finished):
                yield chunk(cid, model, {}, event.reason)
                if with_usage:
                    yield chunk(cid, model, {}, usage_=usage(prompt_tokens, event.completion_tokens))
                yield sse("[DONE]")
                return
            else:
                yield sse(error_body(event.message, "server_error"))
                return
    finally:
        if not job.done:
            job.cancelled = True


def _server(app, cfg: ServeConfig):
    """A uvicorn server whose SIGTERM / SIGINT is a graceful stop that ends the process with status 0
    (uvicorn's own handling re-raises the signal once it has shut down, so the process would die of it)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                print("lit-lora: stopping: finishing the requests in flight", file=sys.stderr, flush=True)
            app.state.lit_lora["stopping"] = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=cfg.grace_period_s,
        access_log=cfg.log_level == "debug",
    )
    return Server(config)


def serve(cfg: ServeConfig) -> None:
    """The command: load, bind, serve until SIGTERM / Ctrl-C."""
    try:
        sock = socket.create_server((cfg.host, cfg.port))
    except OSError as err:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {err.strerror}") from err
    catalog = load(cfg)
    engine = Engine(
        catalog.model,
        pad_id=_pad_id(catalog),
        max_batch_size=cfg.max_batch_size,
        batch_timeout=cfg.batch_timeout,
    )
    app = create_app(cfg, catalog, engine)
    host, port = sock.getsockname()[:2]
    names = ", ".join(catalog.entries)
    print(f"lit-lora: serving {names} on http://{host}:{port}/v1 (OpenAI API)", flush=True)
    _server(app, cfg).run(sockets=[sock])
    print("lit-lora: stopped", file=sys.stderr, flush=True)


def _pad_id(catalog: Catalog) -> int:
    tokenizer = catalog.entries[catalog.base_name].tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def _quote_adapter_list(argv: Sequence[str]) -> list[str]:
    """``adapters=[json=runs/a/adapter,...]`` as written in the docs of other servers: Hydra's grammar
    reads ``=`` inside a list as an error, so each ``name=folder`` item is quoted for it."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key.lstrip("+") == "adapters" and sep and value.startswith("[") and value.endswith("]"):
            items = [i.strip() for i in value[1:-1].split(",") if i.strip()]
            value = "[" + ",".join(i if i[0] in "'\"" else f"'{i}'" for i in items) + "]"
            arg = f"{key}={value}"
        out.append(arg)
    return out


def prepare_argv(argv: Sequence[str]) -> list[str]:
    """The overrides as Hydra can read them (:mod:`lit_lora.cli` applies this first)."""
    return _quote_adapter_list(argv)


def task(cfg: DictConfig) -> None:
    """``lit-lora serve``'s job on the composed config (:mod:`lit_lora.cli`)."""
    serve(typed(cfg, ServeConfig))
