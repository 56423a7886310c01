"""RequestBody: the client's body as the pipeline reads it, with its size limit and the
deadline for each of its pieces (config `limits.body_timeout`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.errors import BodyTimeout, BodyTooLarge, ClientGone
from proxy.request import RequestBody


def paced(pieces: list[tuple[float, dict[str, Any]]]) -> Any:
    """An ASGI receive that gives each message after its pause; then waits forever."""
    queue = list(pieces)

    async def receive() -> dict[str, Any]:
        if not queue:
            await asyncio.Event().wait()
        pause, message = queue.pop(0)
        await asyncio.sleep(pause)
        return message

    return receive


def piece(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


async def test_pieces_each_within_the_timeout_make_the_whole_body_however_long_it_takes() -> None:
    receive = paced([(0.03, piece(b"ab")), (0.03, piece(b"cd")), (0.03, piece(b"e", False))])
    body = RequestBody(receive, limit=None, timeout=0.05)
    assert await body.read_up_to(1000) == b"abcde"  # ~0.09 s in all, over the 0.05 s timeout
    assert body.complete and body.error is None


async def test_a_body_that_stops_coming_is_a_408_naming_what_came() -> None:
    receive = paced([(0.0, piece(b"abc"))])
    body = RequestBody(receive, limit=None, timeout=0.05)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(BodyTimeout) as caught:
        await body.read_up_to(1000)
    assert 0.04 < loop.time() - t0 < 1.0
    assert caught.value.status == 408
    assert "3 bytes received" in caught.value.detail
    assert body.error is caught.value  # what the upstream client reports instead of its echo
    assert not body.complete


async def test_without_a_timeout_the_body_waits_for_the_client() -> None:
    receive = paced([(0.1, piece(b"late", False))])
    body = RequestBody(receive, limit=None, timeout=None)
    assert await body.read_up_to(1000) == b"late"


async def test_the_limit_and_a_client_that_leaves_keep_their_errors() -> None:
    big = RequestBody(paced([(0.0, piece(b"x" * 11))]), limit=10, timeout=1.0)
    with pytest.raises(BodyTooLarge):
        await big.read_up_to(1000)
    gone = RequestBody(paced([(0.0, {"type": "http.disconnect"})]), limit=None, timeout=1.0)
    with pytest.raises(ClientGone):
        await gone.read_up_to(1000)
