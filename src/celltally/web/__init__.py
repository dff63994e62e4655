"""The web application: a FastAPI JSON API and one static page (``celltally serve``).

See :mod:`celltally.web.app` for the endpoints and their status codes.
"""

from celltally.web.app import create_app, serve

__all__ = ["create_app", "serve"]
