"""ASGI entry point: name `mysite.asgi.application` (or
`django.core.asgi.get_asgi_application()`) in WSGI_HANDLER to serve the site
through Django's async stack; async views then run on the gateway's event loop."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = get_asgi_application()
