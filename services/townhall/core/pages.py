"""Opaque, checked positions in an ordered list: AIP-158 page tokens and the Inbox's resume cursors.

A token is base64url (no padding) of: a version byte, 8 bytes naming the request it belongs to (a hash of
its `scope`: the list and the filters that must not change from page to page), the key of the last item
the reader got, and an 8-byte checksum of all that. Decoding checks each, so a changed, truncated or
other request's token is INVALID_ARGUMENT naming the field, never a wrong page. A token is not a secret
and grants nothing: it only says where to go on, and the request it comes with is authorized as usual.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from townhall.core.errors import InvalidArgument

VERSION = 1
# Longer tokens are refused before they are decoded (ours are under 100 characters).
MAX_TOKEN = 256
_HASH = 8
_CHECK_KEY = b"townhall page token"


def seal(scope: str, key: bytes) -> str:
    """The token for going on after `key` in the list `scope` names."""
    body = bytes([VERSION]) + _scope_hash(scope) + key
    return base64.urlsafe_b64encode(body + _check(body)).rstrip(b"=").decode("ascii")


def unseal(token: str, scope: str, field: str = "page_token") -> bytes:
    """The key a token of `scope` carries; InvalidArgument naming `field` if it is not one."""
    if len(token) > MAX_TOKEN:
        raise InvalidArgument(f"{field} is {len(token)} characters; a token is at most {MAX_TOKEN}", field)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    body, check = raw[:-_HASH], raw[-_HASH:]
    if len(body) < 1 + _HASH or body[0] != VERSION or _check(body) != check:
        raise InvalidArgument(
            f"{field} is not a token this service made (changed or cut short?): pass the token of the "
            "previous answer unchanged, or none to start again",
            field,
        )
    if body[1 : 1 + _HASH] != _scope_hash(scope):
        raise InvalidArgument(
            f"{field} belongs to another request (another list, user or view): pass it with the request it "
            "came from (only a page size may change), or none to start again",
            field,
        )
    return body[1 + _HASH :]


def page_size(value: int, default: int, maximum: int, field: str = "page_size") -> int:
    """How many items a page holds: `default` for 0, at most `maximum` (AIP-158: a larger one is clamped)."""
    if value < 0:
        raise InvalidArgument(f"{field} must not be negative, not {value}", field)
    return min(value, maximum) if value else default


def _scope_hash(scope: str) -> bytes:
    return hashlib.blake2b(scope.encode(), digest_size=_HASH).digest()


def _check(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_HASH, key=_CHECK_KEY).digest()
