"""The ``meshlink`` command: one entry and exit-code policy (``_app``), a module per
command group (``service``, ``disk``, ``vchan``)."""

from ._app import main

__all__ = ["main"]
