"""Small helpers for end-to-end tests: posting, polling operations as a Logic App would, fresh alert ids."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

JSON = {"Content-Type": "application/json"}
_counter = itertools.count(1)


def new_ids(n: int) -> list[str]:
    """Alert ids no other test uses (hosts of one session share the emulator's alert state)."""
    base = (os.getpid() % 10000) * 10**8
    return [f"da{637000000000000000 + base + next(_counter):018d}_{i + 1}" for i in range(n)]


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={**JSON, **(headers or {})}) as response:
        text = await response.text()
        return response.status, dict(response.headers), json.loads(text) if text else None


async def wait_for_operation(
    http: aiohttp.ClientSession, location: str, within: float = 30.0
) -> tuple[int, dict[str, Any]]:
    """Poll an operation as a Logic App would, until it is no longer 202 (bounded in time)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        async with http.get(location) as response:
            body = await response.json(content_type=None)
            if response.status != 202:
                return response.status, body
            assert "Retry-After" in response.headers and response.headers["Location"] == location
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"operation still running after {within}s: {body}")
        await asyncio.sleep(0.2)


def sent_bodies(calls: list[dict[str, Any]]) -> list[Any]:
    return [json.loads(c["body"]) for c in calls]


async def eventually(
    probe: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.05
) -> None:
    """Poll `probe` until it holds, for at most `within` seconds (and so a bounded number of times)."""
    for _ in range(max(1, int(within / every))):
        if await probe():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"not within {within}s: {what}")
