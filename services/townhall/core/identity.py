"""Who is calling: the contract every servicer codes against.

Every client RPC carries a user token (`authorization: Bearer <JWT>`, see core/auth.py). The token is
verified once per call where the handlers are wrapped (core/interceptor.py), before the servicer
runs; these functions return what was verified, or refuse.
"""

from __future__ import annotations

from contextvars import ContextVar

import grpc

from townhall.core.auth import AUTHORIZATION, Authenticator, Principal, bearer
from townhall.core.credentials import ServiceCaller
from townhall.core.errors import PermissionDenied, Reason

# Set for each call by the handler wrapper; grpc.aio runs every RPC in a task of its own.
AUTHENTICATOR: ContextVar[Authenticator | None] = ContextVar("townhall_authenticator", default=None)
PRINCIPAL: ContextVar[Principal | None] = ContextVar("townhall_principal", default=None)
# On the internal port: the process that called (verified service credential), and whether it is a
# member of this service passing a call on (a forwarded room or graph call, a part of an import).
SERVICE_CALLER: ContextVar[ServiceCaller | None] = ContextVar("townhall_service_caller", default=None)
FORWARDED: ContextVar[bool] = ContextVar("townhall_forwarded", default=False)

__all__ = [
    "AUTHORIZATION",
    "Principal",
    "bearer",
    "caller",
    "forwarded",
    "principal",
    "require",
    "service_caller",
]


def principal(context: grpc.aio.ServicerContext) -> Principal:
    """The caller's verified identity (user id and grants), or UNAUTHENTICATED saying what is wrong."""
    found = PRINCIPAL.get()
    if found is not None:
        return found
    authenticator = AUTHENTICATOR.get()
    if authenticator is None:
        raise RuntimeError("no Authenticator for this call: servicers must be registered through core.server")
    return authenticator.principal(context.invocation_metadata())


def caller(context: grpc.aio.ServicerContext) -> int:
    """The caller's user id (1..2^63-1), or UNAUTHENTICATED."""
    return principal(context).user_id


def require(context: grpc.aio.ServicerContext, grant: str) -> int:
    """The caller's user id if its token grants `grant`; else PERMISSION_DENIED naming the grant."""
    found = principal(context)
    if grant not in found.grants:
        raise PermissionDenied(missing(grant, found), reason=Reason.MISSING_GRANT)
    return found.user_id


def missing(grant: str, who: Principal, doing: str = "this call") -> str:
    """The message for a token that lacks `grant`."""
    held = ", ".join(sorted(who.grants)) or "none"
    return f"{doing} needs the {grant!r} grant; the token of user {who.user_id} grants: {held}"


def forwarded() -> bool:
    """Whether another member of this service passed the current call on (only on the internal port)."""
    return FORWARDED.get()


def service_caller() -> ServiceCaller:
    """The verified process calling an internal method; a servicer of a client method has none."""
    found = SERVICE_CALLER.get()
    if found is None:
        raise PermissionDenied("this call is internal to Townhall: it needs a service credential")
    return found
