"""One router per resource, as in the FastAPI tutorial layout; :mod:`..app` includes them all."""
