"""The FastAPI example wrapped for WSGI by a2wsgi (its ASGI app runs on a2wsgi's own event loop
thread; each WSGI request blocks a gateway thread until it is answered)."""

from a2wsgi import ASGIMiddleware
from main import app

application = ASGIMiddleware(app)
