"""The coordinator dashboard: a FastAPI app (JSON API, HTML pages, Prometheus) over the registry.

It runs as its own process beside the coordinator (docs/DESIGN.md §2) and reads the same registry
database, so it keeps no state of its own: every page, API answer and scrape is rebuilt from the
registry at request time. Start it with ``fedcl dashboard --db URL``; see :func:`create_app`.
"""

from fedcl.server.canary import evaluate_canary

from .app import create_app

__all__ = ["create_app", "evaluate_canary"]
