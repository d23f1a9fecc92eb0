"""Apps for the operations features: a request that never ends, a slow one, one that leaks."""

import os
import threading
import time
from urllib.parse import parse_qs

_leaked = []


def _background_sleeper():
    while True:
        time.sleep(3600)


threading.Thread(target=_background_sleeper, name="ops-sleeper", daemon=True).start()


def spin_forever():
    while True:
        pass


def nap(seconds):
    time.sleep(seconds)


def app(environ, start_response):
    """`?stuck` loops forever in `spin_forever`; `?started` sends the headers and a chunk first;
    `?nap=S` sleeps S seconds in `nap`; else answers with the process id."""
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    if "stuck" in query:
        spin_forever()
    if "started" in query:
        return started(start_response)
    if "nap" in query:
        nap(float(query["nap"][0]))
    if "fail" in query:
        raise ValueError("failing on purpose")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode("ascii")]


def started(start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first chunk\n"
    spin_forever()


def leak(environ, start_response):
    """Keeps 1 MiB more with every request; answers with the process id."""
    _leaked.append(b"x" * (1 << 20))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode("ascii")]
