"""Paged listings: one backend listing per page, never a scan of the bucket.

A page is one `BlobBackend.list_page` call of at most `limit` keys (1..`MAX_PAGE`), each key
turned into an item (or skipped: revoked, unconfirmed, outside the layout). Its position,
`Page.next_after`, is the last key listed, relative to the listed prefix; a caller hands it
back as `after` for the next page. A position is only ever compared with keys, never written
or used as a path, and is checked (printable ASCII, bounded) before it reaches the backend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from adapter_store.backend import BlobBackend
from adapter_store.errors import InvalidAdapter
from adapter_store.model import Page

__all__ = ["MAX_PAGE", "all_pages", "list_page", "page_limit", "read_at_once"]

#: The largest page a listing returns.
MAX_PAGE = 1000
#: The longest listing position accepted (a key relative to its prefix is much shorter).
_MAX_POSITION = 300

_T = TypeVar("_T")


def page_limit(limit: int) -> int:
    """`limit` if it is a page size (1..MAX_PAGE); InvalidAdapter otherwise."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidAdapter(f"page size must be 1..{MAX_PAGE}")
    return limit


def _start(prefix: str, after: str) -> str:
    """The backend's start position for a listing position `after` (a key relative to
    `prefix`, as returned in `Page.next_after`)."""
    if (
        not isinstance(after, str)
        or len(after) > _MAX_POSITION
        or not (after.isascii() and after.isprintable())
    ):
        raise InvalidAdapter("invalid listing position")
    return prefix + after if after else ""


def list_page(
    backend: BlobBackend,
    prefix: str,
    item: Callable[[str], _T | None],
    *,
    after: str = "",
    limit: int = 100,
    folders: bool = False,
) -> Page[_T]:
    """One page of the keys under `prefix` after the position `after`, each made an item by
    `item` (None: skipped), READERS keys at once, in the listing's order. With `folders`, the
    level under `prefix` only (see `BlobBackend.list_page`). Costs one listing plus whatever
    `item` reads."""
    keys, more = backend.list_page(
        prefix, start_after=_start(prefix, after), limit=page_limit(limit), folders=folders
    )
    items = [found for found in read_at_once(item, keys) if found is not None]
    return Page(items, keys[-1][len(prefix) :] if more and keys else None, len(keys))


#: Items of one page made at once: each may read the store (a manifest GET per adapter), and
#: one after another a page of 1,000 took 5 s on SeaweedFS here. Below boto3's connection pool
#: (10), so that no reader waits for a connection.
READERS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def read_at_once(item: Callable[[str], _T], keys: list[str]) -> list[_T]:
    """`item` of each key, READERS at once, in the keys' order. Never from inside `item`."""
    return list(_readers().map(item, keys)) if len(keys) > 1 else [item(key) for key in keys]


def _readers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READERS, thread_name_prefix="store-page")
        return _pool


def all_pages(page: Callable[[str], Page[_T]]) -> list[_T]:
    """The items of every page, `page(after)` called from the start until the last."""
    items: list[_T] = []
    after = ""
    while True:
        current = page(after)
        items.extend(current.items)
        if current.next_after is None:
            return items
        after = current.next_after
