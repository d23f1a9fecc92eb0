"""FastAPI example for wfastcgi: served as an ASGI application over FastCGI.

WSGI_HANDLER in web.config names `main.app`; the gateway sees that FastAPI's
`__call__` is a coroutine function and serves it as ASGI 3. The counters under
/stats are what the tests read: requests in flight, the most seen at once on
/sleep, http.disconnect messages the app received, streams cut short, and
background tasks run. They are per process, which is what the gateway runs the
event loop in.
"""

import asyncio
import contextlib
import hashlib
import os
from collections import Counter

from fastapi import BackgroundTasks, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

# Seconds /sleep waits unless ?seconds= says otherwise.
SLEEP_SECONDS = float(os.environ.get("FASTAPI_SLEEP_SECONDS", "0.5"))

stats = {
    "in_flight": 0,
    "sleeping": 0,
    "max_sleeping": 0,
    "streams_started": 0,
    "streams_finished": 0,
    "streams_cut": 0,
    "background_done": 0,
    "startups": 0,
}
# Per path: http.disconnect messages received, and send() calls that raised
# (ASGI 2.4 lets a server report a gone client either way).
disconnects = Counter()
send_errors = Counter()


@contextlib.asynccontextmanager
async def lifespan(app):
    stats["startups"] += 1
    # Copied into every request's scope["state"] by the server (request.state).
    yield {"greeting": "hello from lifespan", "pid": os.getpid()}
    shutdown_file = os.environ.get("FASTAPI_SHUTDOWN_FILE")
    if shutdown_file:
        with open(shutdown_file, "a", encoding="utf-8") as f:
            f.write("lifespan shutdown\n")


app = FastAPI(title="wfastcgi FastAPI example", lifespan=lifespan)


class Counting:
    """Pure ASGI middleware: counts requests in flight and what the server
    tells the app about a client that went away."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        path = scope["path"]

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnects[path] += 1
            return message

        async def counted_send(message):
            try:
                await send(message)
            except OSError:
                send_errors[path] += 1
                raise

        stats["in_flight"] += 1
        try:
            await self.inner(scope, counted_receive, counted_send)
        finally:
            stats["in_flight"] -= 1


app.add_middleware(Counting)


class Item(BaseModel):
    name: str = Field(min_length=1, max_length=50)
    price: float = Field(gt=0)
    tags: list[str] = []


@app.get("/")
async def index(request: Request):
    return {
        "app": "fastapi",
        "greeting": request.state.greeting,
        "pid": request.state.pid,
        "root_path": request.scope.get("root_path", ""),
        "path": request.url.path,
        "host": request.headers.getlist("host"),
    }


@app.get("/hello")
async def hello():
    return PlainTextResponse("Hello, World!\n")


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None, limit: int = 10):
    return {"item_id": item_id, "q": q, "limit": limit}


def note_background(name: str):
    stats["background_done"] += 1
    stats["last_background"] = name


@app.post("/items", status_code=201)
async def create_item(item: Item, tasks: BackgroundTasks):
    # Runs after the response is sent.
    tasks.add_task(note_background, item.name)
    return {"created": item.model_dump()}


@app.post("/upload")
async def upload(file: UploadFile = File(...), note: str = Form("")):
    digest = hashlib.sha256()
    size = 0
    while chunk := await file.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return {
        "filename": file.filename,
        "content_type": file.content_type,
        "size": size,
        "sha256": digest.hexdigest(),
        "note": note,
    }


@app.get("/stream")
async def stream(lines: int = 100, delay: float = 0.0, size: int = 0):
    """`lines` lines, `delay` seconds apart; each padded to `size` bytes."""

    async def produce():
        stats["streams_started"] += 1
        sent = 0
        try:
            for n in range(1, lines + 1):
                if delay:
                    await asyncio.sleep(delay)
                line = f"line {n}\n"
                yield line.rjust(size) if size > len(line) else line
                sent += 1
        finally:
            # A stream closed before its last line: the client went away.
            if sent == lines:
                stats["streams_finished"] += 1
            else:
                stats["streams_cut"] += 1

    return StreamingResponse(produce(), media_type="text/plain")


@app.get("/sleep")
async def sleep(seconds: float = SLEEP_SECONDS):
    stats["sleeping"] += 1
    stats["max_sleeping"] = max(stats["max_sleeping"], stats["sleeping"])
    try:
        await asyncio.sleep(seconds)
    finally:
        stats["sleeping"] -= 1
    return {"slept": seconds}


@app.get("/stats")
async def read_stats():
    # This request itself is in flight.
    return {
        **stats,
        "in_flight": stats["in_flight"] - 1,
        "disconnects": dict(disconnects),
        "send_errors": dict(send_errors),
    }


@app.get("/boom")
async def boom():
    raise RuntimeError("boom: deliberate error to show the 500 path")
