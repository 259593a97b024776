"""watch=true: newline-delimited JSON events, from the current state or from a resourceVersion in the
bounded history (ERROR 410 Expired when it is too old), with bookmarks and timeoutSeconds."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from . import errors
from .codec import dumps
from .handlers import JSON, RequestTarget, ResourceHandlers, query_flag
from .store import Converter, Obj, Watcher
from .tables import to_table, wants_table

IDLE_CHECK_SECONDS = 1.0  # how often an idle stream looks for a client that went away


def _line(event_type: str, obj: object) -> bytes:
    return b'{"type":"' + event_type.encode() + b'","object":' + dumps(obj) + b"}\n"


async def serve_watch(
    handlers: ResourceHandlers, request: web.Request, t: RequestTarget, bookmark_interval: float
) -> web.StreamResponse:
    """Stream events until timeoutSeconds, the client leaving, or server stop."""
    store, res, query = handlers.store, t.res, request.query
    matcher, node = handlers.selection(t, query)
    convert: Converter | None = (lambda o: handlers.out(res, o)) if res.group == "events.k8s.io" else None
    variant = res.group
    if wants_table(request.headers.get("Accept", "")):  # kubectl get -w: every event object is a one-row Table
        include = query.get("includeObject", "Metadata")

        def convert(o: Obj) -> Obj:
            return to_table(res.kind, [handlers.out(res, o)], o["metadata"]["resourceVersion"], include)

        variant += "#table"
    watcher = Watcher(res.kind, t.namespace, matcher, variant, convert, node)
    bookmarks = query_flag(query, "allowWatchBookmarks")
    rv_param = query.get("resourceVersion") or ""
    initial: list[bytes] = []
    failure: errors.ApiError | None = None
    # registration and the initial snapshot happen in one synchronous block: no change can slip between
    if rv_param in ("", "0") or query_flag(query, "sendInitialEvents"):
        candidates = (
            (store.get(res.kind, *key) for key in store.pod_keys_on_node(node, t.namespace))
            if node
            else store.iter_objects(res.kind, t.namespace)
        )
        for obj in candidates:
            if obj is None:
                continue
            if matcher is None or matcher(obj):
                initial.append(_line("ADDED", convert(obj) if convert else obj))
        if query_flag(query, "sendInitialEvents"):
            initial.append(_bookmark(res.kind, res.api_version, store.rv, initial_end=True))
        store.add_watcher(watcher)
    else:
        try:
            since = int(rv_param)
        except ValueError:
            raise errors.bad_request(f"invalid resource version: {rv_param}") from None
        try:
            for ch in store.history_since(res.kind, since):
                watcher.offer(ch)
            store.add_watcher(watcher)
        except errors.ApiError as exc:
            failure = exc
    response = web.StreamResponse(status=200, headers={"Content-Type": JSON, "Cache-Control": "no-cache"})
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        if failure is not None:
            await response.write(_line("ERROR", failure.status()))
            return response
        if initial:
            await response.write(b"".join(initial))
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout else None
        next_bookmark = time.monotonic() + bookmark_interval
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if watcher.queue.empty():
                if bookmarks and now >= next_bookmark:
                    # everything up to store.rv is already queued or filtered out: the version is safe
                    await response.write(_bookmark(res.kind, res.api_version, store.rv))
                    next_bookmark = now + bookmark_interval
                    continue
                wait = IDLE_CHECK_SECONDS
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if bookmarks:
                    wait = min(wait, next_bookmark - now)
                try:
                    line = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.01))
                except TimeoutError:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                    continue
            else:
                line = watcher.queue.get_nowait()
            if line is None:  # server stopping
                break
            chunk, stopping = [line], False
            while not watcher.queue.empty() and len(chunk) < 1000:
                more = watcher.queue.get_nowait()
                if more is None:
                    stopping = True
                    break
                chunk.append(more)
            await response.write(b"".join(chunk))
            if stopping:
                break
    except ConnectionResetError:
        pass  # the client went away
    finally:
        store.remove_watcher(watcher)
    return response


def _bookmark(kind: str, api_version: str, rv: int, initial_end: bool = False) -> bytes:
    meta: dict[str, object] = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return _line("BOOKMARK", {"kind": kind, "apiVersion": api_version, "metadata": meta})
