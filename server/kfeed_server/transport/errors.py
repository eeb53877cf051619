"""Errors a servicer raises, and how they become gRPC statuses (AIP-193).

Servicers raise :class:`ApiError` subclasses; :mod:`kfeed_server.transport.interceptors` turns them
into a status with rich details, so every RPC reports bad input the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One offending request field, named by its path (e.g. ``page_size``, ``tickers[2]``)."""

    field: str
    description: str


class ApiError(Exception):
    """An error with a gRPC status code that is safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=self.code.value[0], message=self.message)


class InvalidArgument(ApiError):
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming every offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        )
        status.details.append(detail)
        return status


class NotFound(ApiError):
    """NOT_FOUND with a google.rpc.ResourceInfo naming the missing resource."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, resource_type: str, resource_name: str) -> None:
        self.resource_type = resource_type
        self.resource_name = resource_name
        super().__init__(f"{resource_type} {resource_name!r} not found")

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.ResourceInfo(
                resource_type=self.resource_type, resource_name=self.resource_name
            )
        )
        status.details.append(detail)
        return status


class FailedPrecondition(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(ApiError):
    """The caller may not do this (e.g. a token without the method's role)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(ApiError):
    """An RPC of the contract this server does not serve yet."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(ApiError):
    """Try again shortly (e.g. the server is still starting)."""

    code = grpc.StatusCode.UNAVAILABLE


def internal_status(request_id: str) -> status_pb2.Status:
    """What the caller sees for an unexpected failure: no internals, just the id to quote."""
    return status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error (request id {request_id})"
    )
