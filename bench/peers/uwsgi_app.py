"""uWSGI's entry point (`--wsgi-file`): the bench app named by BENCH_APP_DIR."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import wsgi_loader  # noqa: E402

application = wsgi_loader.load(os.environ["BENCH_APP_DIR"])
