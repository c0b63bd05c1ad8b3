"""The bridge between one HTTP request and the Executor's loop thread.

A ``Generation`` enqueues one executor request per prompt; the executor's callbacks hop onto the
server's asyncio loop with ``call_soon_threadsafe``. Whatever way the HTTP request ends (finished,
client gone, server shutting down), ``cancel`` frees the blocks of the prompts not finished yet.
``EventStream`` sends server-sent events and notices a client that goes away even while no event is
due, whichever ASGI version the server speaks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial

from starlette.responses import Response as HTTPResponse
from starlette.types import Receive, Scope, Send

from kiln.runtime.executor import Executor
from kiln.runtime.request import Request, Response
from kiln.serve.metrics import ServerMetrics
from kiln.serve.protocol import PromptTokensDetails, Usage

logger = logging.getLogger(__name__)

LIVENESS_POLL_SECONDS = 1.0


class EngineStopped(Exception):
    """The executor's loop ended while a request waited for it."""


class Generation:
    def __init__(self, executor: Executor, requests: list[Request], metrics: ServerMetrics):
        self.executor = executor
        self.metrics = metrics
        self._queue: asyncio.Queue[tuple[int, Response]] = asyncio.Queue()
        self._unfinished = set(range(len(requests)))
        # Each prompt's tokens so far, per choice (usage, and the inter-token latency metric).
        self.num_output_tokens: list[list[int]] = [[] for _ in requests]
        self.num_prompt_tokens = sum(len(r.input_token_ids) for r in requests)
        self.num_cached_tokens = [0] * len(requests)
        self._ids: list[int] = []
        loop = asyncio.get_running_loop()
        try:
            for index, request in enumerate(requests):
                callback = partial(loop.call_soon_threadsafe, self._deliver, index)
                self._ids.append(executor.enqueue_request(request, on_response=callback))
        except BaseException:
            self.cancel()
            raise

    @property
    def is_finished(self) -> bool:
        return not self._unfinished

    def _deliver(self, index: int, response: Response) -> None:
        """On the event loop: count tokens, observe metrics at the end, queue for the consumer."""
        self._queue.put_nowait((index, response))
        if response.has_error():
            self._unfinished.discard(index)
            self.metrics.observe_error()
            return
        result = response.result
        self.num_cached_tokens[index] = result.num_cached_prompt_tokens
        counts = self.num_output_tokens[index]
        counts.extend([0] * (len(result.output_token_ids) - len(counts)))
        for choice, tokens in enumerate(result.output_token_ids):
            counts[choice] += len(tokens)
        if result.is_final:
            self._unfinished.discard(index)
            self.metrics.observe_finished(result, counts)

    async def next_response(self) -> tuple[int, Response]:
        """(prompt index, response); raises EngineStopped if the executor's loop has died."""
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), LIVENESS_POLL_SECONDS)
            except asyncio.TimeoutError:
                if not self.executor.is_alive() and self._queue.empty():
                    raise EngineStopped("the engine stopped before the request finished") from None

    async def responses(self) -> AsyncIterator[tuple[int, Response]]:
        while not self.is_finished or not self._queue.empty():
            yield await self.next_response()

    def usage(self) -> Usage:
        completion_tokens = sum(map(sum, self.num_output_tokens))
        return Usage(prompt_tokens=self.num_prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.num_prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.num_cached_tokens)))

    def cancel(self) -> None:
        """Cancels the prompts not finished yet (safe to call more than once)."""
        for index in self._unfinished:
            if index < len(self._ids):
                self.executor.cancel_request(self._ids[index])
        self._unfinished.clear()


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work):
    """Awaits ``work``; returns None instead if the client disconnects first (``work`` is cancelled)."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
    return work_task.result() if work_task.done() and not work_task.cancelled() else None


class EventStream(HTTPResponse):
    """A text/event-stream of ``events`` (each already ``data: ...\\n\\n``); ``on_close`` runs however the
    stream ends: finished, client gone, or cancelled by a server shutting down."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no body: no content-length
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await unless_disconnected(receive, pump())
        except OSError:  # the client went away while a chunk was being written
            logger.debug("client disconnected mid-stream")
        finally:
            self.on_close()
