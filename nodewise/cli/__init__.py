"""The top layer: the ``nodewise`` command and its back ends (demo, profile, status, up/down)."""

from nodewise.cli.app import app, main

__all__ = ["app", "main"]
