"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from pagedformers.engine.input_processor import InvalidRequest
from pagedformers.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError",
    413: "RequestTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError", 504: "TimeoutError",
}
_PARAM = re.compile(r"(?:Sampling|Pooling)Params\.(\w+)=")


class OpenAIError(Exception):
    """A request the server answers with an error; the server itself is fine."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    @classmethod
    def from_value_error(cls, error: ValueError, param: str | None = None) -> OpenAIError:
        """A ValueError from SamplingParams, PoolingParams or the input processor: the user's mistake, so a 400,
        naming the field at fault (the error's own, else the one its message names, else `param`)."""
        match = _PARAM.search(str(error))
        own = error.param if isinstance(error, InvalidRequest) else None
        field = own or (match.group(1) if match else None) or param
        return cls(str(error), 400, field)

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=_TYPES.get(self.status, "Error"),
                                             param=self.param, code=self.status))


def error_json(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    body = OpenAIError(message, status, param).to_response()
    return JSONResponse(body.model_dump(), status_code=status)
