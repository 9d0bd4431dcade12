"""Every gRPC call ends with a status a client can act on: never UNKNOWN, never silence.

grpcio answers a message its deserializer cannot parse with UNKNOWN ("Unexpected
DecodeError"), the status of a server fault, and a handler that raises with UNKNOWN too. This
interceptor wraps every unary-unary handler: a message that does not parse (protobuf's parser
also refuses nesting deeper than 100 levels) becomes a marker, and the handler then aborts
with INVALID_ARGUMENT and a message naming the expected type; any other exception is the
catch-all, INTERNAL with ``internal error (request_id ...)``, its traceback logged under that
id and never sent. Messages over the server's size limit are refused by grpcio itself with
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

__all__ = ["DecodeErrorInterceptor"]

log = logging.getLogger("genserve.grpc")


class _Undecodable:
    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = type_name.full_name if type_name is not None else "the request message"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError, RecursionError):
            return _Undecodable(type_name)

    return parse


def _guarded(behavior: Callable[..., Awaitable[Any]], method: str,
             ) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {request.type_name} message "
                                "(protobuf wire format)")
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler's own answer
        except Exception:
            request_id = secrets.token_hex(8)
            log.exception("internal error on %s (request_id %s)", method, request_id)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error (request_id {request_id})")

    return call


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _guarded(handler.unary_unary, handler_call_details.method),
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
