"""Apps for the Windows scenarios (tests/iis): byte-exact echo and download, the paths the
application sees, and a slow request."""

import json
import os
import sys
import time
from urllib.parse import parse_qs

PATTERN = bytes(range(256)) * 4096  # 1 MiB


def _query(environ, name, default):
    return int(parse_qs(environ.get("QUERY_STRING", "")).get(name, [default])[0])


def echo(environ, start_response):
    """Streams the body back as it arrives: IIS must be able to write while it reads."""
    length = environ.get("CONTENT_LENGTH") or "0"
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", length)])
    stream = environ["wsgi.input"]

    def chunks():
        while chunk := stream.read(65536):
            yield chunk
    return chunks()


def download(environ, start_response):
    """`n` bytes of PATTERN, repeated, in 1 MiB chunks."""
    n = _query(environ, "n", 1024)
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(n))])

    def chunks():
        left = n
        while left > 0:
            chunk = PATTERN[:min(left, len(PATTERN))]
            left -= len(chunk)
            yield chunk
    return chunks()


def paths(environ, start_response):
    try:
        import venv_marker
        marker = venv_marker.__file__
    except ImportError:
        marker = None
    cwd = os.getcwd()
    body = json.dumps({
        "cwd": cwd,
        "path0": sys.path[0],
        "file": __file__,
        "relpath": os.path.relpath(__file__, cwd),
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "version": sys.version,
        "venv_marker": marker,
        "path_info": environ.get("PATH_INFO"),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def slow(environ, start_response):
    """Answers after `ms` milliseconds."""
    time.sleep(_query(environ, "ms", 1000) / 1000)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slow done"]
