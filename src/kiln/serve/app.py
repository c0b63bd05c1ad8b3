"""The FastAPI app over an Executor: OpenAI's /v1 routes, /health, /metrics, /version.

Every error, FastAPI's own validation errors included, is answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; bad input is a 400 naming the field, never a 500.
With an API key, every /v1 route needs ``Authorization: Bearer KEY`` (compared in constant time);
/health, /metrics and /version stay open for probes and scrapers.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from kiln.runtime.executor import Executor
from kiln.runtime.llm import DEFAULT_MODEL_NAME
from kiln.serve import protocol as p
from kiln.serve.serving import APIError, OpenAIServing
from kiln.version import __version__

logger = logging.getLogger(__name__)

ERROR_RESPONSES = {status: {"model": p.ErrorResponse, "description": description} for status, description in (
    (400, "invalid request: the message names the field and the limit"),
    (401, "missing or wrong API key"),
    (404, "unknown model"),
    (429, "queue full (--max-queue-size)"),
    (503, "engine not running"),
)}


def _require_api_key(api_key: str):
    expected = api_key.encode()
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key / KILN_API_KEY")

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    return check


def _validation_error(exc: RequestValidationError, content_type: str) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first problem, naming its field."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    if loc and loc[0] == "body":
        loc = loc[1:]
    param = ".".join(str(part) for part in loc) or None
    kind = error["type"]
    if param is None and "json" not in content_type:
        message = "the request body must be JSON; send the header 'Content-Type: application/json'"
    elif kind == "json_invalid":
        param = None
        message = f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    elif kind == "extra_forbidden":
        message = f"unrecognized request argument: {param}"
    elif kind == "missing":
        message = f"{param} is required" if param else "the request needs a JSON body"
    else:
        message = f"{param}: {error['msg']}" if param else f"request body: {error['msg']}"
    return APIError(400, message, param=param)


def _openapi_without_422(app: FastAPI):
    """FastAPI documents a 422 for every route with a body; kiln answers those as 400s."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(executor: Executor, model_name: str = DEFAULT_MODEL_NAME, api_key: str | None = None,
               max_queue_size: int | None = None, chat_template: str | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``executor`` as ``model_name``. The caller owns the executor
    (and shuts it down after the server stops)."""
    serving = OpenAIServing(executor, model_name, max_queue_size, chat_template)
    app = FastAPI(title="kiln", version=__version__, description="OpenAI-compatible server of a kiln engine")
    app.state.serving = serving

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc, request.headers.get("content-type", "")).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()

    v1 = APIRouter(prefix="/v1", responses=ERROR_RESPONSES,
                   dependencies=[Depends(_require_api_key(api_key))] if api_key else [])

    @v1.post("/completions", response_model=None,
             responses={200: {"model": p.CompletionResponse, "content": {"text/event-stream": {}}}})
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request.receive)

    @v1.post("/chat/completions", response_model=None,
             responses={200: {"model": p.ChatCompletionResponse, "content": {"text/event-stream": {}}}})
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request.receive)

    def model_card() -> p.ModelCard:
        return p.ModelCard(id=model_name, created=p.now(), max_model_len=serving.build_config.max_seq_len)

    @v1.get("/models")
    async def models() -> p.ModelList:
        return p.ModelList(data=[model_card()])

    # ``:path``: served names such as "org/model" hold slashes (sent raw, or as %2F by the openai client).
    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> p.ModelCard:
        serving.check_model(model_id)
        return model_card()

    app.include_router(v1)

    @app.get("/health", responses={503: {"model": p.ErrorResponse}})
    async def health() -> dict[str, str]:
        if not executor.is_alive():
            raise APIError(503, "the engine loop is not running", type="server_error", code="engine_unavailable")
        return {"status": "ok"}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = _openapi_without_422(app)
    return app
