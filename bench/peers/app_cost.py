"""What calling a bench app costs in a plain Python loop, with a minimal environ: the part of a
request no FastCGI server can avoid. Prints {"ns_per_call": ...} (the best of several repeats).

    python app_cost.py APP_DIR [--path /] [--body-bytes N]
"""

import argparse
import io
import json
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import wsgi_loader  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("app_dir")
    parser.add_argument("--path", default="/")
    parser.add_argument("--body-bytes", type=int, default=0)
    args = parser.parse_args()
    app = wsgi_loader.load(args.app_dir)
    body = b"x" * args.body_bytes
    environ = {
        "REQUEST_METHOD": "POST" if body else "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": args.path,
        "HTTP_HOST": "localhost",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }

    def start_response(status, headers, exc_info=None):
        return None

    def request():
        # What any server does with the result: iterate it, then close it if it can be.
        if body:
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
        result = app(dict(environ), start_response)
        try:
            for _ in result:
                pass
        finally:
            if hasattr(result, "close"):
                result.close()

    timer = timeit.Timer(request)
    number, _ = timer.autorange()
    best = min(timer.repeat(repeat=5, number=number)) / number
    print(json.dumps({"ns_per_call": best * 1e9, "calls_per_repeat": number}))


if __name__ == "__main__":
    main()
