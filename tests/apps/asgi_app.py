"""Raw ASGI 3 test applications (no framework): see README.md."""

import asyncio
import hashlib
import json
import os
import urllib.parse

# Requests this process is running (the concurrency and leak tests read it through /inflight).
IN_FLIGHT = 0
PEAK = 0


def _query(scope):
    return dict(urllib.parse.parse_qsl(scope["query_string"].decode("latin-1")))


async def _respond(send, status, body, content_type=b"text/plain", headers=()):
    await send({
        "type": "http.response.start",
        "status": status,
        # Lists, as the spec writes them (other apps use tuples).
        "headers": [[b"content-type", content_type],
                    [b"content-length", str(len(body)).encode()]] + list(headers),
    })
    await send({"type": "http.response.body", "body": body})


async def _json(send, value, status=200):
    await _respond(send, status, json.dumps(value).encode(), b"application/json")


async def _read_body(receive):
    """The whole body: (data, chunk count)."""
    data = bytearray()
    chunks = 0
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        data += message.get("body", b"")
        chunks += 1
        if not message.get("more_body", False):
            return bytes(data), chunks


async def app(scope, receive, send):
    """Hello, with lifespan ignored (it raises on the lifespan scope)."""
    assert scope["type"] == "http", scope["type"]
    await _respond(send, 200, b"Hello, ASGI!\n")


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


async def scope_app(scope, receive, send):
    """The scope as JSON (bytes as latin-1 str)."""
    if scope["type"] == "lifespan":
        return
    await _json(send, _plain(dict(scope)))


async def echo_app(scope, receive, send):
    """{"length", "sha256", "chunks"} of the body, read with receive() in a loop."""
    if scope["type"] == "lifespan":
        return
    data, chunks = await _read_body(receive)
    await _json(send, {"length": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "chunks": chunks})


async def cancelled_receive_app(scope, receive, send):
    """A receive() cancelled before its piece of the body arrives (as Starlette's
    is_disconnected() does), then the body read whole: the echo must be complete."""
    if scope["type"] == "lifespan":
        return
    early = asyncio.get_running_loop().create_task(receive())
    await asyncio.sleep(0)
    early.cancel()
    try:
        await early
    except asyncio.CancelledError:
        pass
    data, chunks = await _read_body(receive)
    await _json(send, {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()})


async def count_app(scope, receive, send):
    """Counts its bytes without keeping them (for the memory bound)."""
    if scope["type"] == "lifespan":
        return
    total = 0
    digest = hashlib.sha256()
    while True:
        message = await receive()
        body = message.get("body", b"")
        total += len(body)
        digest.update(body)
        if not message.get("more_body", False):
            break
    await _json(send, {"length": total, "sha256": digest.hexdigest()})


async def stream_app(scope, receive, send):
    """`n` chunks of `size` bytes of x (more_body), `sleep` seconds apart; no Content-Length."""
    if scope["type"] == "lifespan":
        return
    q = _query(scope)
    n, size, sleep = int(q.get("n", 5)), int(q.get("size", 10)), float(q.get("sleep", 0))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    for _ in range(n):
        await send({"type": "http.response.body", "body": b"x" * size, "more_body": True})
        if sleep:
            await asyncio.sleep(sleep)
    await send({"type": "http.response.body", "body": b""})


class Lifespan:
    """An object whose __call__ is a coroutine function, with lifespan state: startup sets
    state["started"], requests report it (after `sleep` seconds, counted in flight); shutdown
    prints `lifespan shutdown after N in flight` (to the log)."""

    def __init__(self):
        self.events = []

    async def __call__(self, scope, receive, send):
        global IN_FLIGHT
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    scope["state"]["started"] = "yes"
                    print("lifespan startup", flush=True)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    print(f"lifespan shutdown after {IN_FLIGHT} in flight", flush=True)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        sleep = float(_query(scope).get("sleep", 0))
        if sleep:
            IN_FLIGHT += 1
            print("slow request started", flush=True)
            try:
                await asyncio.sleep(sleep)
            finally:
                IN_FLIGHT -= 1
        await _json(send, {"state": scope["state"], "events": self.events})


lifespan_app = Lifespan()


async def failing_startup(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
        return
    await _respond(send, 200, b"never\n")


async def slow_app(scope, receive, send):
    """Sleeps `sleep` seconds (default 0.5) while counting requests in flight; reports the peak."""
    global IN_FLIGHT, PEAK
    if scope["type"] == "lifespan":
        return
    q = _query(scope)
    if scope["path"].endswith("/inflight"):
        return await _json(send, {"in_flight": IN_FLIGHT, "peak": PEAK})
    IN_FLIGHT += 1
    PEAK = max(PEAK, IN_FLIGHT)
    try:
        await asyncio.sleep(float(q.get("sleep", 0.5)))
    finally:
        IN_FLIGHT -= 1
    await _json(send, {"peak": PEAK})


async def pathsend_app(scope, receive, send):
    """http.response.pathsend of the file named by the query's `path`, when the scope offers it."""
    if scope["type"] == "lifespan":
        return
    assert "http.response.pathsend" in scope["extensions"], scope["extensions"]
    path = _query(scope)["path"]
    headers = [(b"content-type", b"application/octet-stream")]
    if os.path.exists(path):
        headers.append((b"content-length", str(os.path.getsize(path)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.pathsend", "path": path})


DISCONNECTS = []


async def disconnect_app(scope, receive, send):
    """/upload reads the body until http.disconnect; /stream streams until send() raises;
    /wait reads the body, then waits in receive(); /seen reports what each saw and the requests
    still running."""
    global IN_FLIGHT
    if scope["type"] == "lifespan":
        return
    path = scope["path"]
    if path.endswith("/seen"):
        return await _json(send, {"seen": DISCONNECTS, "in_flight": IN_FLIGHT})
    IN_FLIGHT += 1
    try:
        if path.endswith("/wait"):
            await _read_body(receive)
            print("waiting for http.disconnect", flush=True)
            message = await receive()
            DISCONNECTS.append(f"wait: {message['type']}")
            return
        if path.endswith("/upload"):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    DISCONNECTS.append("upload: http.disconnect")
                    return
                if not message.get("more_body"):
                    DISCONNECTS.append("upload: complete")
                    return await _respond(send, 200, b"complete\n")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x" * 65536,
                            "more_body": True})
        except OSError as e:
            DISCONNECTS.append(f"stream: {type(e).__name__}")
            message = await receive()
            DISCONNECTS.append(f"stream: {message['type']}")
            raise
    finally:
        IN_FLIGHT -= 1


class NotDetected:
    """An ASGI app that hides it: a plain __call__ returning a coroutine. WSGI_INTERFACE=asgi
    makes it work."""

    def __call__(self, scope, receive, send):
        return app(scope, receive, send)


not_detected = NotDetected()


CANCELLED = []


async def sleep_for_an_hour():
    await asyncio.sleep(3600)


async def stuck_app(scope, receive, send):
    """/sleep awaits for an hour (recording its cancellation), /stubborn goes on awaiting once
    cancelled, /spin never yields; anything else reports the pid and the cancellations seen."""
    if scope["type"] == "lifespan":
        return
    path = scope["path"]
    if path.endswith("/sleep"):
        try:
            await sleep_for_an_hour()
        except asyncio.CancelledError:
            CANCELLED.append("sleep")
            raise
    if path.endswith("/stubborn"):
        try:
            await sleep_for_an_hour()
        except asyncio.CancelledError:
            await sleep_for_an_hour()
    if path.endswith("/spin"):
        while True:
            pass
    return await _json(send, {"pid": os.getpid(), "cancelled": CANCELLED})


async def never_drains(scope, receive, send):
    """Lifespan startup starts a non-daemon thread that never ends; lifespan shutdown never
    completes: stopping takes the whole grace, once."""
    if scope["type"] == "lifespan":
        await receive()
        import threading
        threading.Thread(target=threading.Event().wait, name="never-ends", daemon=False).start()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await asyncio.sleep(3600)
        return
    await _respond(send, 200, b"ok\n")
