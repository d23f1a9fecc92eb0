"""Streams `size` bytes (query string, default 1 MiB) in 64 KiB chunks, no Content-Length.

Byte i of the body is i % 256, so the client can check every byte without a hash; the chunk is
built once, so the app's own cost is only the iteration.
"""

from urllib.parse import parse_qs

CHUNK_LEN = 65536
CHUNK = bytes(range(256)) * (CHUNK_LEN // 256)


def app(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    size = int(query.get("size", [str(1 << 20)])[0])
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return chunks(size)


def chunks(size):
    full, rest = divmod(size, CHUNK_LEN)
    for _ in range(full):
        yield CHUNK
    if rest:
        yield CHUNK[:rest]
