"""Fails on import, to test how the gateway reports a broken WSGI_HANDLER."""

raise ImportError("simulated import failure")
