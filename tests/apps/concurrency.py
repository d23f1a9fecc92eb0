"""Apps that show how many requests one process serves at once."""

import os
import threading
import time
from urllib.parse import parse_qs

# Four requests must be inside the app at the same time to pass; fewer threads time out.
_barrier = threading.Barrier(4, timeout=20)


def barrier(environ, start_response):
    _barrier.wait()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"met"]


def sleepy(environ, start_response):
    """Sleep `sleep` seconds (default 1), then answer with the process id."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    time.sleep(float(query.get("sleep", ["1"])[0]))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode("ascii")]
