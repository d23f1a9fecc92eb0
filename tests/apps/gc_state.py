"""The garbage collector's state, as a request sees it."""

import gc


def app(environ, start_response):
    """How many objects `gc.freeze()` moved out of the collector's way."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(gc.get_freeze_count()).encode()]


async def asgi_app(scope, receive, send):
    """The same, for the ASGI bridge (frozen after lifespan startup)."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(gc.get_freeze_count()).encode()})
