"""Who is calling: the user id every client RPC carries in the `townhall-user` metadata key.

This is the development identity; token authentication replaces it behind this one function.
"""

from __future__ import annotations

import grpc

from townhall.core.errors import Unauthenticated
from townhall.core.validation import USER_ID_MAX

USER_KEY = "townhall-user"


def caller(context: grpc.aio.ServicerContext) -> int:
    """The caller's user id, or UNAUTHENTICATED naming what is wrong with it."""
    for key, value in context.invocation_metadata() or ():
        if key == USER_KEY:
            text = value if isinstance(value, str) else value.decode("ascii", "replace")
            if not text.isdigit() or not 0 < int(text) <= USER_ID_MAX:
                raise Unauthenticated(
                    f"metadata {USER_KEY} must be a user id within 1..{USER_ID_MAX}, not {text[:40]!r}"
                )
            return int(text)
    raise Unauthenticated(f"metadata {USER_KEY} (the caller's user id) is required")


def metadata(user: int) -> tuple[tuple[str, str], ...]:
    """Client-side metadata that identifies `user`."""
    return ((USER_KEY, str(user)),)
