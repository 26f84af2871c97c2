"""API errors as `{"error": {"message", "type"}}` with the right status code."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidal.errors import ImageError, TidalError

logger = logging.getLogger("tidal.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers


def error_body(message: str, type: str) -> dict:
    # Escape anything that cannot be UTF-8 (a lone surrogate echoed from input).
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type}}


def error_response(status: int, message: str, type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type), status_code=status, headers=headers)


def _describe(exc: RequestValidationError) -> str:
    parts = []
    errors = exc.errors()
    for err in errors[:5]:
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _describe(exc), "invalid_request_error")

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, f"malformed JSON body: {exc}", "invalid_request_error")

    @app.exception_handler(ImageError)
    async def _image(_: Request, exc: ImageError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_image")

    @app.exception_handler(TidalError)
    async def _tidal(_: Request, exc: TidalError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal error; the server log has the details", "server_error")
