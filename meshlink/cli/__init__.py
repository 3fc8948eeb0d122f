"""The ``meshlink`` command: one entry point, a module per command group."""

from .service import main

__all__ = ["main"]
