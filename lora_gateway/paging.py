"""Page sizes and page tokens of the admin listings (ListAdapters, GetResidency).

A page token is opaque to clients and tamper-evident: `<payload>.<mac>`, where the payload is
the URL-safe base64 of a JSON array `[1, rpc, scope, phase, after]` and the mac the first 16
bytes of its HMAC-SHA256 under the deployment's paging key (`KeyRing.derive_key`: the same on
every replica that reads the same tenants file, unknown to tenants). `scope` binds a token to
the request it continues (the tenant listed, include_shared), so a token cannot be replayed on
another tenant's listing, edited to jump elsewhere, or made up: any of these is INVALID_ARGUMENT
with `INVALID_TOKEN_TEXT`. `phase` and `after` are the listing's position (`Page.next_after`).
The position is checked again by the store (`adapter_store.pages`) and only ever
compared with keys: it never names an object. A new tenants file (other key hashes) changes the
key: tokens issued before it are refused, and the client lists again from the start.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

from lora_gateway.errors import InvalidArgument

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "INVALID_TOKEN_TEXT",
    "MAX_PAGE_SIZE",
    "Cursor",
    "PageTokens",
    "page_size",
]

#: Adapters examined per page when the request leaves page_size 0.
DEFAULT_PAGE_SIZE = 50
#: The most adapters one page examines; larger requests are lowered to it.
MAX_PAGE_SIZE = 200
#: Longer tokens are refused before they are decoded.
MAX_TOKEN_CHARS = 1024
#: The answer to a page token that is not one this deployment issued for this request.
INVALID_TOKEN_TEXT = (
    "invalid page_token: pass the next_page_token of the previous page of the same request "  # noqa: S105
    "(same tenant and options), or none to start again"
)
_VERSION = 1
_MAC_BYTES = 16


def page_size(requested: int) -> int:
    """The page size to use for a request's `page_size` (0 = the default; capped)."""
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0 (0 = {DEFAULT_PAGE_SIZE}), got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class Cursor:
    """Where a listing continues: a phase of the listing and a position within it."""

    phase: str
    after: str = ""


class PageTokens:
    """Issues and checks page tokens under one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, rpc: str, scope: str, cursor: Cursor) -> str:
        body = json.dumps([_VERSION, rpc, scope, cursor.phase, cursor.after], separators=(",", ":"))
        payload = base64.urlsafe_b64encode(body.encode()).rstrip(b"=")
        mac = base64.urlsafe_b64encode(self._mac(payload)).rstrip(b"=")
        return (payload + b"." + mac).decode("ascii")

    def parse(self, token: str, rpc: str, scope: str) -> Cursor | None:
        """The cursor of `token` (None for "", the first page); InvalidArgument otherwise."""
        if not token:
            return None
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise InvalidArgument(INVALID_TOKEN_TEXT)
        payload, _, mac = token.encode("ascii").partition(b".")
        try:
            given = base64.urlsafe_b64decode(mac + b"=" * (-len(mac) % 4))
        except (binascii.Error, ValueError):
            raise InvalidArgument(INVALID_TOKEN_TEXT) from None
        if not hmac.compare_digest(given, self._mac(payload)):
            raise InvalidArgument(INVALID_TOKEN_TEXT)
        try:
            body = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        except (binascii.Error, ValueError):
            raise InvalidArgument(INVALID_TOKEN_TEXT) from None
        if (
            not isinstance(body, list)
            or len(body) != 5
            or body[:3] != [_VERSION, rpc, scope]
            or not all(isinstance(part, str) for part in body[3:])
        ):
            raise InvalidArgument(INVALID_TOKEN_TEXT)
        return Cursor(phase=body[3], after=body[4])
