"""Jinja2 templates of the dashboard pages.

This ``__init__.py`` only makes the folder a package, so setuptools ships the ``.html`` files as
package data (setup.py includes data files of package folders only).
"""
