"""Apps that read the request body in every way PEP 3333 allows."""

import hashlib
import json


def _json(start_response, data):
    body = json.dumps(data).encode("utf-8")
    start_response("200 OK", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ])
    return [body]


def _lines_result(lines):
    # Line lengths show where the gateway's input split the body into lines.
    return {
        "lines": [len(line) for line in lines],
        "sha256": hashlib.sha256(b"".join(lines)).hexdigest(),
    }


def app(environ, start_response):
    """Read the body in fixed-size chunks and report its size and hash."""
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    length = 0
    while chunk := stream.read(8192):
        digest.update(chunk)
        length += len(chunk)
    return _json(start_response, {
        "length": length,
        "sha256": digest.hexdigest(),
        "method": environ.get("REQUEST_METHOD"),
        "content_type": environ.get("CONTENT_TYPE"),
    })


def readline_app(environ, start_response):
    lines = []
    while line := environ["wsgi.input"].readline():
        lines.append(line)
    return _json(start_response, _lines_result(lines))


def readline_limit_app(environ, start_response):
    """readline(10) must never return more than 10 bytes."""
    lines = []
    while line := environ["wsgi.input"].readline(10):
        lines.append(line)
    return _json(start_response, _lines_result(lines))


def ignore_body_app(environ, start_response):
    """Leave the body unread: the gateway must still finish the request."""
    body = b"ignored"
    start_response("200 OK", [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
    ])
    return [body]


def readlines_app(environ, start_response):
    lines = environ["wsgi.input"].readlines()
    return _json(start_response, _lines_result(lines))


def iter_app(environ, start_response):
    lines = list(environ["wsgi.input"])
    return _json(start_response, _lines_result(lines))


def read_all_app(environ, start_response):
    """read() with no size is allowed in practice, though PEP 3333 omits it."""
    data = environ["wsgi.input"].read()
    return _json(start_response, {
        "length": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    })


def seek_app(environ, start_response):
    """Read the body twice, seeking back in between, when wsgi.input allows it."""
    import io

    stream = environ["wsgi.input"]
    first = stream.read()
    result = {"length": len(first), "sha256": hashlib.sha256(first).hexdigest(),
              "seekable": stream.seekable()}
    try:
        result["tell"] = stream.tell()
        stream.seek(0)
        stream.read(3)
        stream.seek(-2, 1)
        again = stream.read()
        result["again_length"] = len(again) + 1
        result["again_sha256"] = hashlib.sha256(first[:1] + again).hexdigest()
    except io.UnsupportedOperation as error:
        result["error"] = str(error)
    return _json(start_response, result)
