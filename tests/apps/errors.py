"""Apps that break the WSGI contract or fail, one way each."""

import sys

TEXT = [("Content-Type", "text/plain")]


def call_error(environ, start_response):
    raise ValueError("boom in call")


def iter_error(environ, start_response):
    start_response("200 OK", list(TEXT))

    def chunks():
        yield b"partial"
        raise RuntimeError("boom in iteration")

    return chunks()


class _CloseRaises:
    """An iterable whose close() fails after the body was sent."""

    def __iter__(self):
        yield b"body"

    def close(self):
        raise RuntimeError("boom in close")


def close_error(environ, start_response):
    start_response("200 OK", list(TEXT))
    return _CloseRaises()


def bad_header(environ, start_response):
    # A newline in a value would allow header injection.
    start_response("200 OK", TEXT + [("X-Bad", "a\nb")])
    return [b"x"]


def bad_status(environ, start_response):
    start_response("abc", list(TEXT))
    return [b"x"]


def non_bytes_body(environ, start_response):
    start_response("200 OK", list(TEXT))
    return ["a str"]


def returns_str(environ, start_response):
    # A str is iterable, so a naive gateway would send it char by char.
    start_response("200 OK", list(TEXT))
    return "a str"


def returns_none(environ, start_response):
    start_response("200 OK", list(TEXT))
    return None


def no_start_response(environ, start_response):
    return [b"x"]


def start_twice(environ, start_response):
    # Without exc_info, a second call must raise (PEP 3333).
    start_response("200 OK", list(TEXT))
    start_response("201 Created", list(TEXT))
    return [b"x"]


def exc_info_app(environ, start_response):
    """Replace the status after an error, which is allowed before any body."""
    start_response("200 OK", list(TEXT))
    try:
        raise ValueError("handled error")
    except ValueError:
        start_response("500 Internal Server Error", list(TEXT),
                       sys.exc_info())
    return [b"error body"]


def sys_exit_app(environ, start_response):
    sys.exit(3)


def prints_app(environ, start_response):
    # Under FastCGI, stray prints must not corrupt the protocol stream.
    print("to stdout")
    print("to stderr", file=sys.stderr)
    environ["wsgi.errors"].write("to wsgi.errors\n")
    start_response("200 OK", list(TEXT))
    return [b"printed"]


# One entry per close() call on close_tracker's iterables.
closed = []


class _Tracked:
    def __iter__(self):
        yield b"tracked"

    def close(self):
        closed.append(True)


def close_tracker(environ, start_response):
    start_response("200 OK", list(TEXT))
    return _Tracked()


def close_count(environ, start_response):
    """Report how many times close_tracker's iterables were closed."""
    start_response("200 OK", list(TEXT))
    return [str(len(closed)).encode("ascii")]


class _SlowTracked(_Tracked):
    def __init__(self, n, sleep):
        self.n, self.sleep = n, sleep

    def __iter__(self):
        import time

        for _ in range(self.n):
            time.sleep(self.sleep)
            yield b"x"


def tracked(environ, start_response):
    """One process for a close() count: `/count` reports, `/slow` streams slowly, else
    close_tracker."""
    path = environ.get("PATH_INFO")
    if path == "/count":
        return close_count(environ, start_response)
    if path == "/slow":
        start_response("200 OK", list(TEXT))
        return _SlowTracked(100, 0.05)
    return close_tracker(environ, start_response)


def non_str_header(environ, start_response):
    start_response("200 OK", [("X-Number", 1)])
    return [b"x"]
