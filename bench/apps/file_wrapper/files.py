"""Sends a file through wsgi.file_wrapper with its Content-Length.

The file is a sparse file of `size` bytes (query string, default 1 MiB) in the temporary folder,
made on first use with truncate, so a 1 GiB file costs no disk space. A server without
wsgi.file_wrapper (PEP 3333 makes it optional; wfastcgi.py and flup have none) gets the same
file read in 64 KiB blocks by the fallback below, as applications are told to do.
"""

import os
import tempfile
from urllib.parse import parse_qs

BLOCK = 65536


def sparse_path(size):
    return os.path.join(tempfile.gettempdir(), "wfastcgi-bench-sparse-%d.bin" % size)


def sparse_file(size):
    path = sparse_path(size)
    if not os.path.exists(path) or os.path.getsize(path) != size:
        partial = "%s.%d" % (path, os.getpid())
        with open(partial, "wb") as f:
            f.truncate(size)
        os.replace(partial, path)
    return path


class Blocks:
    """The fallback wrapper: a file iterated in blocks, closed by the server."""

    def __init__(self, file, block_size):
        self.file = file
        self.block_size = block_size

    def __iter__(self):
        while True:
            data = self.file.read(self.block_size)
            if not data:
                return
            yield data

    def close(self):
        self.file.close()


def app(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    size = int(query.get("size", [str(1 << 20)])[0])
    path = sparse_file(size)
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))],
    )
    wrapper = environ.get("wsgi.file_wrapper", Blocks)
    return wrapper(open(path, "rb"), BLOCK)
