"""The one error type the CLI turns into a friendly message instead of a traceback.

Every user mistake (a bad config field, a missing data folder, a corrupt update) is raised as a
subclass of :class:`FedclError` whose message names the file, field or site and says what would
be valid. Subpackages define their own subclasses; they live here because ``config`` sits below
every other subpackage.
"""


class FedclError(Exception):
    """A problem the user can fix; its message is printed as is, without a traceback."""


class ConfigError(FedclError, ValueError):
    """An experiment or site configuration that does not validate."""
