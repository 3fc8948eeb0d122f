"""Test support shared by several test files: peer scripts and helper modules.

The ``*_peer.py``, ``*_server.py`` and ``*_hostile.py`` files here are scripts
the tests start as separate processes (by path); the other modules
(``bus_service``, ``connect_certs``, ``nbd``) are imported by test files.
"""
