"""ASGI apps that break the ASGI contract or fail, one way each (the counterparts of errors.py).
Each ignores lifespan by returning at once, which the gateway treats as unsupported."""

import sys

HEAD = {"type": "http.response.start", "status": 200,
        "headers": [(b"content-type", b"text/plain")]}


async def call_error(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    raise ValueError("boom in call")


async def error_after_start(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send(HEAD)
    await send({"type": "http.response.body", "body": b"partial", "more_body": True})
    raise RuntimeError("boom after start")


async def error_after_start_before_body(scope, receive, send):
    """http.response.start went to the gateway, but no byte to the web server: still a 500."""
    if scope["type"] == "lifespan":
        return
    await send(HEAD)
    raise RuntimeError("boom before the body")


async def bad_header(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-bad", b"a\nb")]})
    await send({"type": "http.response.body", "body": b"x"})


async def bad_header_type(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [("x-str", "not bytes")]})
    await send({"type": "http.response.body", "body": b"x"})


async def bad_status(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": "200 OK", "headers": []})
    await send({"type": "http.response.body", "body": b"x"})


async def start_twice(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send(HEAD)
    await send(HEAD)


async def body_before_start(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.body", "body": b"x"})


async def non_bytes_body(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send(HEAD)
    await send({"type": "http.response.body", "body": "a str"})


async def never_sends(scope, receive, send):
    if scope["type"] == "lifespan":
        return


async def returns_after_start(scope, receive, send):
    """Started, one chunk with more_body, then returns: the response is ended."""
    if scope["type"] == "lifespan":
        return
    await send(HEAD)
    await send({"type": "http.response.body", "body": b"unfinished", "more_body": True})


async def body_after_end(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send(HEAD)
    await send({"type": "http.response.body", "body": b"done"})
    await send({"type": "http.response.body", "body": b"more"})


async def websocket_message(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send({"type": "websocket.accept"})


async def trailers(scope, receive, send):
    """Asks for trailers: they are dropped (FastCGI has none); the body arrives whole."""
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": 200, "trailers": True,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"with trailers"})
    await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")],
                "more_trailers": False})


async def sys_exit_app(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    sys.exit(3)


async def prints_app(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    print("printed by the ASGI app")
    import logging
    logging.getLogger("asgi-test").warning("logged by the ASGI app")
    await send(HEAD)
    await send({"type": "http.response.body", "body": b"ok"})
