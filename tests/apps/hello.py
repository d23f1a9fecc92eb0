"""Minimal WSGI apps: a greeting, an environ dump and validated variants."""

import hashlib
import json
from wsgiref.validate import validator

BODY = b"Hello, World!\n"


def app(environ, start_response):
    start_response("200 OK", [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(BODY))),
    ])
    return [BODY]


def environ_app(environ, start_response):
    """Return the environ as JSON so tests can check what the gateway set."""
    data = {}
    for key, value in environ.items():
        # bool is a subclass of int, so it is kept by this check as well.
        if isinstance(value, (str, int, tuple)):
            data[key] = value
        elif isinstance(value, bytes):
            # WSGI strings are latin-1 based; keep bytes readable the same way.
            data[key] = value.decode("latin-1")
    body = json.dumps(data, sort_keys=True).encode("utf-8")
    start_response("200 OK", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ])
    return [body]


def _echo(environ, start_response):
    # Kept local (not imported from echo.py) so this module stands alone.
    # read(n) with one argument is what the validator's input wrapper accepts.
    digest = hashlib.sha256()
    length = 0
    while chunk := environ["wsgi.input"].read(8192):
        digest.update(chunk)
        length += len(chunk)
    body = json.dumps({"length": length, "sha256": digest.hexdigest()})
    body = body.encode("utf-8")
    start_response("200 OK", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ])
    return [body]


# wsgiref's validator asserts that gateway and app both follow PEP 3333.
validated = validator(app)
validated_echo = validator(_echo)


def sys_app(environ, start_response):
    """Report the interpreter the gateway embeds, so tests can check the venv and version."""
    import os
    import sys

    body = json.dumps({
        "version": sys.version.split()[0],
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "path": sys.path,
        "cwd": os.getcwd(),
        "settings_env": os.environ.get("WFASTCGI_TEST_SETTING", ""),
    }).encode("utf-8")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


class _Factory:
    """For a WSGI_HANDLER with a call in the middle: ``hello.make().app``."""

    app = staticmethod(app)


def make():
    return _Factory()
