"""Apps whose body is produced piece by piece, without a Content-Length."""

import io
import time
from urllib.parse import parse_qs

HEADERS = [("Content-Type", "application/octet-stream")]


def _params(environ):
    """Read n, size and sleep from the query string, with defaults."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    n = int(query.get("n", ["5"])[0])
    size = int(query.get("size", ["10"])[0])
    sleep = float(query.get("sleep", ["0.2"])[0])
    return n, size, sleep


def app(environ, start_response):
    n, size, _ = _params(environ)
    start_response("200 OK", list(HEADERS))
    # A generator means the gateway cannot know the length up front.
    return (b"x" * size for _ in range(n))


def lazy_app(environ, start_response):
    """A generator function: start_response runs only on the first next()."""
    n, size, _ = _params(environ)
    start_response("200 OK", list(HEADERS))
    for _ in range(n):
        yield b"x" * size


def slow_app(environ, start_response):
    """Sleep before every chunk, so tests can see chunks arrive over time."""
    n, size, sleep = _params(environ)
    start_response("200 OK", list(HEADERS))

    def chunks():
        for _ in range(n):
            time.sleep(sleep)
            yield b"x" * size

    return chunks()


def write_app(environ, start_response):
    """Send part of the body via the legacy write() callable, then return."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"one\n")
    write(b"two\n")
    return [b"end"]


# Counts close() calls on the files and generators below, per process.
closes = []


class _CountingFile(io.FileIO):
    def close(self):
        if not self.closed:
            closes.append("file")
        super().close()


def files(environ, start_response):
    """`/count` reports closes; otherwise serve `path` through wsgi.file_wrapper, as a real
    file or (`kind=bytesio`) a file-like object without a descriptor, with an optional
    Content-Length `length` and block size `blksize`."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if environ.get("PATH_INFO") == "/count":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(len(closes)).encode("ascii")]
    path = query["path"][0]
    headers = list(HEADERS)
    if "length" in query:
        headers.append(("Content-Length", query["length"][0]))
    blksize = int(query.get("blksize", ["8192"])[0])
    if query.get("kind", ["file"])[0] == "bytesio":
        with open(path, "rb") as source:
            filelike = io.BytesIO(source.read())
    else:
        filelike = _CountingFile(path, "rb")
    start_response("200 OK", headers)
    return environ["wsgi.file_wrapper"](filelike, blksize)


def tracked_stream(environ, start_response):
    """A long generator body; `/count` reports how many were closed."""
    if environ.get("PATH_INFO") == "/count":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(len(closes)).encode("ascii")]
    start_response("200 OK", list(HEADERS))

    def chunks():
        try:
            for _ in range(100000):
                yield b"x" * 65536
        finally:
            closes.append("generator")

    return chunks()


def works_after_last_chunk(environ, start_response):
    """Declares a Content-Length, yields all of it, then keeps working inside the generator
    until the file `flag` (query) exists, at most 10 s, and prints whether it was released.
    Only a client that got the whole body before the generator ended can create the file."""
    import os

    flag = parse_qs(environ.get("QUERY_STRING", ""))["flag"][0]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])

    def chunks():
        yield b"hello"
        deadline = time.monotonic() + 10
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
        print("released" if os.path.exists(flag) else "never released")

    return chunks()
