"""Benchmarks that measure meshlink against peers in the same run.

Each ``bench_*.py`` is a script, run as a module from the repository root
(``python3 -m bench.bench_vchan --help``) so that it can import the helpers it
shares with the other scripts (``_peers``, ``_figures``, ``_streams``); its
child processes are started the same way.
"""
