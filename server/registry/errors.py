"""The one exception type the registry lets escape to callers.

The coordinator CLI prints these messages to operators as-is, so each one names what the operator
needs to act on: the (password-masked) database URL, the run id, the artifact file, the bad value.
"""

from __future__ import annotations

import re

from fedcl.config.errors import FedclError

_PASSWORD_IN_URL = re.compile(r"(?P<head>://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)")


class RegistryError(FedclError, RuntimeError):
    """A registry operation failed for a reason an operator can understand and fix."""


def mask_url(url: str) -> str:
    """Hide the password in a URL string that SQLAlchemy could not even parse.

    Parsed URLs are masked with ``URL.render_as_string(hide_password=True)``; this regex is the
    fallback for malformed ones, which are exactly the URLs that end up in error messages.
    """
    return _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", url)
