"""The Python half of the ASGI bridge (src/python/asgi.rs): the event loop, lifespan, and the
receive()/send() callables of each request. Rust owns every socket; this runs on the
`wfastcgi-asgi` thread only."""

import asyncio
import socket
import sys
import threading
import traceback

# The wake-up socket pair lives as long as the process: Rust writes to it by descriptor.
_keep = []
# Each running request's task by its request's key, for the watchdog (`watched_task`).
_tasks = {}


class ClientDisconnected(OSError):
    """send() after the web server aborted the request or went away (ASGI 2.4)."""


def new_loop():
    """uvloop when it is importable, else asyncio's default (the Proactor loop on Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop(), "asyncio"
    return uvloop.new_event_loop(), "uvloop"


def run(bridge, app):
    loop, kind = new_loop()
    asyncio.set_event_loop(loop)
    bridge.log(f"ASGI event loop: {kind}")
    try:
        loop.run_until_complete(_main(bridge, app, loop))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _main(bridge, app, loop):
    rsock, wsock = socket.socketpair()
    rsock.setblocking(False)
    wsock.setblocking(False)
    _keep.append((rsock, wsock))
    state = {}
    lifespan = _Lifespan(app, state, bridge)
    failure = await lifespan.startup()
    if failure is not None:
        bridge.started(failure)
        return
    bridge.started(None, wsock.fileno())
    tasks = set()
    stop = loop.create_future()

    def dispatch():
        _dispatch(bridge, app, state, tasks, stop, loop)

    def wake():
        try:
            rsock.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
        dispatch()

    try:
        # A reader callback: no future, no task step and no epoll change per wake-up.
        loop.add_reader(rsock, wake)
        stop_waking = lambda: loop.remove_reader(rsock)
    except NotImplementedError:
        # The Proactor loop (Windows) has no add_reader.
        stop_waking = loop.create_task(_wait_wakes(rsock, dispatch, loop)).cancel
    await stop
    # Stop comes once the connections (or, under IIS, the worker) are done, so every response is
    # complete; tasks still running (work after the response) get to finish, bounded by the
    # grace in Rust. The wake-ups go on completing their futures meanwhile.
    if tasks:
        await asyncio.wait(tasks)
    await lifespan.shutdown()
    stop_waking()


async def _wait_wakes(rsock, dispatch, loop):
    while True:
        await loop.sock_recv(rsock, 4096)
        dispatch()


def _dispatch(bridge, app, state, tasks, stop, loop):
    """Takes what the workers and pumps hand over: new requests, completed futures, stop."""
    for item in bridge.drain():
        if item[0] == 0:
            scope = item[1]
            scope["state"] = state.copy()
            task = loop.create_task(_serve(app, scope, item[2], loop))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif item[0] == 1:
            future = item[1]
            if not future.done():
                future.set_result(item[2])
        elif not stop.done():
            stop.set_result(None)


class _Lifespan:
    def __init__(self, app, state, bridge):
        self.app = app
        self.state = state
        self.bridge = bridge
        self.inbox = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.started = loop.create_future()
        self.stopped = loop.create_future()
        self.supported = True
        self.task = None

    async def startup(self):
        """None when the application started (or does not handle lifespan), else the reason."""
        self.inbox.put_nowait({"type": "lifespan.startup"})
        self.task = asyncio.get_running_loop().create_task(self._run())
        return await self.started

    async def shutdown(self):
        if not self.supported or self.task.done():
            return
        self.inbox.put_nowait({"type": "lifespan.shutdown"})
        failure = await self.stopped
        if failure is not None:
            self.bridge.log(f"ASGI lifespan shutdown failed: {failure}", True)
        await self.task

    async def _run(self):
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self.inbox.get, self._send)
        except BaseException:
            if not self.started.done():
                self.supported = False
                self.bridge.log(
                    "the application does not handle ASGI lifespan (it raised on the "
                    "lifespan scope); serving without it:\n" + traceback.format_exc()
                )
            else:
                self.bridge.log("ASGI lifespan failed:\n" + traceback.format_exc(), True)
        finally:
            if not self.started.done():
                self.supported = False
                self.started.set_result(None)
            if not self.stopped.done():
                self.stopped.set_result(None)

    async def _send(self, message):
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.started.set_result(None)
        elif kind == "lifespan.startup.failed":
            self.started.set_result(message.get("message") or "lifespan.startup.failed")
        elif kind == "lifespan.shutdown.complete":
            self.stopped.set_result(None)
        elif kind == "lifespan.shutdown.failed":
            self.stopped.set_result(message.get("message") or "lifespan.shutdown.failed")
        else:
            raise RuntimeError(f"unexpected ASGI lifespan message type {kind!r}")


async def _serve(app, scope, request, loop):
    exchange = _Exchange(request, loop)
    key = request.key
    _tasks[key] = asyncio.current_task()
    try:
        await app(scope, exchange.receive, exchange.send)
    except BaseException as e:
        # Not re-raised, not even SystemExit: a task's would stop the loop, and every request.
        if isinstance(e, ClientDisconnected) or exchange.disconnected:
            request.gone()
        else:
            request.fail(traceback.format_exc())
    else:
        request.returned()
    finally:
        del _tasks[key]


def watched_task(key, wait):
    """For the watchdog, on its own thread: `None` when the request has no task, `False` when the
    loop did not run a callback within `wait` seconds (a task that never yields blocks it),
    else the stack of the task, suspended, every frame of the coroutines it awaits, outermost
    first."""
    task = _tasks.get(key)
    if task is None:
        return None
    loop = task.get_loop()
    answered = threading.Event()
    loop.call_soon_threadsafe(answered.set)
    if not answered.wait(wait):
        return False
    frames = []
    awaited = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return "".join(traceback.format_list(traceback.StackSummary.extract(frames)))


class _Exchange:
    """receive() and send() of one request."""

    __slots__ = (
        "request", "loop", "body_done", "started", "complete", "disconnected", "watch", "pending"
    )

    def __init__(self, request, loop):
        self.request = request
        self.loop = loop
        self.body_done = False
        self.started = False
        self.complete = False
        self.disconnected = False
        self.watch = None
        self.pending = None

    async def receive(self):
        if not self.body_done and not self.disconnected:
            # A receive() cancelled while waiting (Starlette's is_disconnected() does so at once)
            # leaves its piece of the body for the next one.
            future = self.pending
            if future is None:
                future = self.pending = self.loop.create_future()
                self.request.receive(future)
            chunk = await asyncio.shield(future)
            self.pending = None
            if chunk is None:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if chunk is not False:
                return {"type": "http.request", "body": chunk, "more_body": True}
            self.body_done = True
            self.disconnected = True
        if not (self.disconnected or self.complete):
            if self.watch is None:
                self.watch = self.loop.create_future()
                self.request.watch(self.watch)
            await asyncio.shield(self.watch)
            self.disconnected = True
        return {"type": "http.disconnect"}

    async def send(self, message):
        kind = message["type"]
        if self.disconnected:
            raise ClientDisconnected("the client went away")
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent a second time")
            self.request.start(message["status"], message.get("headers", ()))
            self.started = True
        elif kind == "http.response.body":
            if not self.started or self.complete:
                self._check_streaming(kind)
            more = bool(message.get("more_body", False))
            self.complete = not more
            pending = self.request.body(message.get("body", b""), more, self.loop)
            if pending is not True:
                await self._wait(pending)
        elif kind == "http.response.pathsend":
            self._check_streaming(kind)
            self.complete = True
            await self._wait(self.request.pathsend(message["path"], self.loop.create_future()))
        elif kind == "http.response.trailers":
            # FastCGI has no trailers: accepted and dropped.
            if not self.started:
                raise RuntimeError("http.response.trailers before http.response.start")
        else:
            raise RuntimeError(f"unexpected ASGI message type {kind!r} on an http scope")

    def _check_streaming(self, kind):
        if not self.started:
            raise RuntimeError(f"{kind} before http.response.start")
        if self.complete:
            raise RuntimeError(f"{kind} after the response was complete")

    async def _wait(self, pending):
        """`pending` is the future to wait for, or False when gone."""
        if pending is not False:
            pending = await pending
            if pending is True:
                return
            if isinstance(pending, str):
                raise OSError(pending)
        self.disconnected = True
        raise ClientDisconnected("the client went away")


def cancel_task(key):
    """For the watchdog: cancels the request's task, if it still runs."""
    task = _tasks.get(key)
    if task is not None:
        task.get_loop().call_soon_threadsafe(task.cancel)
