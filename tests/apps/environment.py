"""The process environment, as the application sees it."""

import json
import os


def app(environ, start_response):
    """`os.environ` as JSON."""
    body = json.dumps(dict(os.environ)).encode("utf-8")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
