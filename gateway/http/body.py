"""Request bodies: read with a size cap (413 beyond it) and a time limit (408), and decode
into a wire type (400 for broken JSON, 422 naming the field for the wrong shape)."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from gateway.errors import PayloadTooLarge, RequestTimeout
from gateway.http.context import GATEWAY
from gateway.http.problems import decode_error

T = TypeVar("T")


async def read_capped(request: web.Request, cap: int) -> bytes:
    """The body, at most `cap` bytes (413 beyond), arriving within FLASHCLAIM_BODY_TIMEOUT_S
    (408 otherwise: a trickled body must not hold a handler for ever)."""
    if request.content_length is not None and request.content_length > cap:
        raise PayloadTooLarge(f"Body is over the {cap}-byte limit")
    content = request.content
    if content.is_eof():  # the whole body came with the head (a claim's usual `{}`)
        body = content.read_nowait(cap + 1)
        if len(body) > cap:
            raise PayloadTooLarge(f"Body is over the {cap}-byte limit")
        return body
    chunks: list[bytes] = []
    size = 0
    timeout_s = request.app[GATEWAY].settings.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s or None):
            while True:
                chunk = await content.read(cap + 1 - size)
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    raise PayloadTooLarge(f"Body is over the {cap}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"The body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


def decode(decoder: msgspec.json.Decoder[T], body: bytes, *, empty: Any = None) -> T:
    if not body.strip() and empty is not None:
        return empty  # type: ignore[no-any-return]
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as e:
        raise decode_error(e) from None
