"""Runs Microsoft's wfastcgi.py 3.0.0 (from PyPI) on Linux, unmodified, as IIS would: records on
fd 0, responses written back to fd 0.

wfastcgi.py binds Windows APIs at import time (`ctypes.windll.kernel32.<name>` with `restype` and
`argtypes` set on each). They are used only by its file watcher, which `WSGI_RESTART_FILE_REGEX`
set to "" in web.config turns off, and by the `_FCGI_SHUTDOWN_EVENT_` waiter, which needs that
variable (IIS sets it; we do not). So a stub that accepts those attribute assignments, and fails
loudly if a function is ever called, is all it needs.

Windows file names ignore case, and wfastcgi.py opens `Web.config`; the bench apps, like the
project's, name it `web.config`. `get_environment` is wrapped to find it the way Windows would,
and then wfastcgi.py's own reader parses it.
"""

import ctypes
import os
import sys
import tempfile


class _WindowsFunction:
    """Stands for a kernel32 function: takes restype/argtypes, must never be called."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args):
        raise OSError("kernel32.%s is not available on Linux (bench stub)" % self.name)


class _Kernel32:
    def __getattr__(self, name):
        function = _WindowsFunction(name)
        setattr(self, name, function)  # wfastcgi.py sets restype/argtypes on the same object
        return function


class _WinDLL:
    kernel32 = _Kernel32()


ctypes.windll = _WinDLL()

import wfastcgi  # noqa: E402  (must come after the stub)

_get_environment = wfastcgi.get_environment


def _get_environment_any_case(directory):
    names = [n for n in os.listdir(directory) if n.lower() == "web.config"]
    if not names or "Web.config" in names:
        return _get_environment(directory)
    # Give wfastcgi.py's reader the file under the name it expects.
    with tempfile.TemporaryDirectory() as alias:
        os.symlink(os.path.join(directory, names[0]), os.path.join(alias, "Web.config"))
        return _get_environment(alias)


wfastcgi.get_environment = _get_environment_any_case

if __name__ == "__main__":
    sys.exit(wfastcgi.main())
