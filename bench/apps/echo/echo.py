"""Reads the request body in 64 KiB pieces and answers with its length and SHA-256.

The body is never held whole, so the server's own buffering is what the peak RSS shows.
"""

import hashlib
import json

CHUNK = 65536


def app(environ, start_response):
    stream = environ["wsgi.input"]
    # CONTENT_LENGTH bounds the reads: reading past it is not allowed by PEP 3333.
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    digest = hashlib.sha256()
    length = 0
    while remaining > 0:
        data = stream.read(min(CHUNK, remaining))
        if not data:
            break
        digest.update(data)
        length += len(data)
        remaining -= len(data)
    body = json.dumps({"length": length, "sha256": digest.hexdigest()}).encode()
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]
