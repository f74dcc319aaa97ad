"""The dashboard's own CSS and JavaScript (Plotly itself is served from the plotly package).

This ``__init__.py`` only makes the folder a package, so setuptools ships the ``.js``/``.css``
files as package data (setup.py includes data files of package folders only).
"""
