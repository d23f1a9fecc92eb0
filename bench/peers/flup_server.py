"""flup's threaded FastCGI server on a Unix socket (no Nagle delays, like the other peers).

    python flup_server.py APP_DIR SOCKET_PATH

Stops on SIGINT/SIGTERM (flup's own handlers).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flup.server.fcgi import WSGIServer  # noqa: E402

import wsgi_loader  # noqa: E402

if __name__ == "__main__":
    app_dir, socket_path = sys.argv[1:3]
    application = wsgi_loader.load(app_dir)
    WSGIServer(application, bindAddress=socket_path, umask=0o077).run()
