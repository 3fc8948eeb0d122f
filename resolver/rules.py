"""Static rules: a TOML file mapping names (exact, or by domain suffix) to endpoints.

Theory of operation
-------------------
In the manner of MirageOS conduit's resolver rewrite rules, an operator states
where names live without any network discovery::

    # exact names win over suffix rewrites
    [names]
    "storage-node" = ["tls://10.0.0.5:7001", "tcp://10.0.0.5:7002"]

    # names ending in ".rack1": {host} is the name without the suffix,
    # {name} the whole name; the longest matching suffix wins
    [[rewrite]]
    suffix = ".rack1"
    endpoints = ["tls://{host}.rack1.example.net:7001"]

The file is read with :mod:`tomllib`.  Every error -- TOML syntax, a wrong
type, a malformed endpoint URL, an unknown key -- raises
:class:`~resolver.errors.RulesError` naming the file and the line.  TOML parsers do not
report positions of values, so for semantic errors the line is found by
searching the text for the offending key or string; this is exact for the
usual one-entry-per-line layout.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._types import Endpoint
from .errors import RulesError

__all__ = ["ENV_VAR", "Rewrite", "Rules", "load_rules"]

ENV_VAR = "MESHLINK_RULES"
_LINE_RE = re.compile(r"at line (\d+)")


@dataclass(frozen=True)
class Rewrite:
    """A suffix rewrite: names ending in ``suffix`` map to ``templates``."""

    suffix: str
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Rules:
    """Parsed rules.

    Attributes:
        path: the file they came from.
        names: exact names to endpoints.
        rewrites: suffix rewrites, longest suffix first.
    """

    path: str
    names: dict[str, tuple[Endpoint, ...]]
    rewrites: tuple[Rewrite, ...]

    def lookup(self, name: str) -> list[Endpoint]:
        """Endpoints for ``name``: the exact entry, else the longest matching suffix.

        Raises:
            RulesError: a rewrite produced an invalid endpoint for this name
                (for example a host that is not a valid DNS label).
        """
        exact = self.names.get(name)
        if exact is not None:
            return list(exact)
        for rw in self.rewrites:
            if name.endswith(rw.suffix) and len(name) > len(rw.suffix):
                host = name[: -len(rw.suffix)]
                out = []
                for tpl in rw.templates:
                    url = tpl.format(name=name, host=host)
                    try:
                        out.append(Endpoint.parse(url, source="rules"))
                    except ValueError as exc:
                        raise RulesError(self.path, 0, f"rewrite {rw.suffix!r}: {exc}") from exc
                return out
        return []


def _line_of(text: str, needle: str) -> int:
    """The first line defining key ``needle`` (``key =``, ``"key" =``, ``[key]``),
    else the first line containing it, else 0."""
    q = re.escape(needle)
    defining = re.compile(rf"""^\s*(?:\[\[?\s*)?(?:{q}|"{q}"|'{q}')\s*(?:=|\])""")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if defining.match(line):
            return n
    for n, line in enumerate(lines, 1):
        if needle in line:
            return n
    return 0


def _endpoints(value: Any, path: str, text: str, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RulesError(path, _line_of(text, key),
                         f"{key}: expected a non-empty list of endpoint URLs")
    return list(value)


def _check_url(url: str, path: str, text: str) -> Endpoint:
    try:
        return Endpoint.parse(url, source="rules")
    except ValueError as exc:
        raise RulesError(path, _line_of(text, url), str(exc)) from exc


def parse_rules(text: str, path: str = "<rules>") -> Rules:
    """Parse the text of a rules file.

    Args:
        text: TOML text.
        path: shown in error messages.

    Returns:
        The parsed :class:`Rules`.

    Raises:
        RulesError: syntax or content error; the message starts with ``path:line:``.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _LINE_RE.search(str(exc))
        line = int(m.group(1)) if m else 0
        if m is None and "end of document" in str(exc):
            line = len(text.splitlines())
        raise RulesError(path, line, f"TOML syntax: {exc}") from exc
    for key in doc:
        if key not in ("names", "rewrite"):
            raise RulesError(path, _line_of(text, key),
                             f"unknown key {key!r} (expected [names] or [[rewrite]])")
    names: dict[str, tuple[Endpoint, ...]] = {}
    table = doc.get("names", {})
    if not isinstance(table, dict):
        raise RulesError(path, _line_of(text, "names"), "names must be a table")
    for name, value in table.items():
        urls = _endpoints(value, path, text, name)
        names[name] = tuple(_check_url(u, path, text) for u in urls)
    rewrites: list[Rewrite] = []
    entries = doc.get("rewrite", [])
    if not isinstance(entries, list):
        raise RulesError(path, _line_of(text, "rewrite"), "rewrite must be an array of tables")
    for entry in entries:
        suffix = entry.get("suffix") if isinstance(entry, dict) else None
        if not isinstance(suffix, str) or not suffix.startswith("."):
            raise RulesError(path, _line_of(text, "suffix"),
                             "each [[rewrite]] needs suffix = \".domain\" (starting with a dot)")
        assert isinstance(entry, dict)
        extra = set(entry) - {"suffix", "endpoints"}
        if extra:
            key = sorted(extra)[0]
            raise RulesError(path, _line_of(text, key), f"unknown key {key!r} in [[rewrite]]")
        templates = _endpoints(entry.get("endpoints"), path, text, "endpoints")
        for tpl in templates:
            try:
                url = tpl.format(name="example", host="example")
            except (KeyError, IndexError, ValueError) as exc:
                raise RulesError(path, _line_of(text, tpl),
                                 f"bad template {tpl!r}: use only {{name}} and {{host}}") from exc
            _check_url(url, path, text)
        rewrites.append(Rewrite(suffix, tuple(templates)))
    rewrites.sort(key=lambda rw: -len(rw.suffix))
    return Rules(path, names, tuple(rewrites))


def load_rules(path: str | os.PathLike[str] | None = None) -> Rules | None:
    """Read a rules file: ``path``, else ``$MESHLINK_RULES``, else none.

    Returns:
        The rules, or ``None`` when no file is configured.

    Raises:
        RulesError: the file cannot be read or is malformed.
    """
    if path is None:
        env = os.environ.get(ENV_VAR)
        if not env:
            return None
        path = env
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(str(p), 0, f"cannot read rules file: {exc}") from exc
    return parse_rules(text, str(p))


def rules_from(source: Rules | str | os.PathLike[str] | None) -> Rules | None:
    """Accept parsed rules, a path, or ``None`` (environment)."""
    if isinstance(source, Rules):
        return source
    return load_rules(source)
