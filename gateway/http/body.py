"""Request bodies: read with a size cap (413 beyond it) and decode into a wire type
(400 for broken JSON, 422 naming the field for the wrong shape)."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from aiohttp import web

from gateway.errors import PayloadTooLarge
from gateway.http.problems import decode_error

T = TypeVar("T")


async def read_capped(request: web.Request, cap: int) -> bytes:
    if request.content_length is not None and request.content_length > cap:
        raise PayloadTooLarge(f"Body is over the {cap}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(cap + 1 - size)
        if not chunk:
            break
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"Body is over the {cap}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(decoder: msgspec.json.Decoder[T], body: bytes, *, empty: Any = None) -> T:
    if not body.strip() and empty is not None:
        return empty  # type: ignore[no-any-return]
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as e:
        raise decode_error(e) from None
