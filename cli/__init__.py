"""The ``fedcl`` command line (Typer), composed from each side's sub-commands."""
