"""Placeholders in a managed instance's command and environment: ``{port}``, ``{unix}``,
``{host}``, ``{name}``, ``{replica}``, ``{model}``, ``{python}``.

The syntax is ``str.format``'s, parsed by ``string.Formatter`` (so its rules are the ones a
Python user knows): ``{name}`` is replaced, ``{{`` and ``}}`` are literal braces, and a single
brace is an error. Only the names of ``PLACEHOLDERS`` are known; a positional field (``{}``,
``{0}``), an attribute or index (``{port.x}``), a conversion (``{port!r}``) or a format spec
(``{port:5}``) is an error too, so that a typo fails when the instance is defined rather than
becoming part of the argument a process receives.

Pure: no I/O.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping

PLACEHOLDERS: Mapping[str, str] = {
    "port": "the replica's TCP port (from manager.port_range, or base_port + 1 + replica)",
    "unix": "the path of the replica's unix socket (instead of a port)",
    "host": "the address replicas listen on (manager.host)",
    "name": "the instance's name",
    "replica": "the replica's index, 0 to replicas - 1",
    "model": "the instance's first model",
    "python": "the interpreter running the router",
}

_FORMATTER = string.Formatter()


class PlaceholderError(ValueError):
    """What is wrong with a template; the message quotes the offending field."""


def fields(template: str) -> list[str]:
    """The placeholder names in ``template``, in order (repeats kept); ``PlaceholderError``
    for a stray brace or a field that is not a known name."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:  # "Single '}' encountered", "expected '}' before end of string"
        raise PlaceholderError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    names = []
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        whole = "{" + field + (f"!{conversion}" if conversion else "") + (
            f":{spec}" if spec else "") + "}"
        if field not in PLACEHOLDERS or spec or conversion:
            known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
            raise PlaceholderError(f"unknown placeholder {whole} (known: {known}; write "
                                   "{{ and }} for literal braces)")
        names.append(field)
    return names


def used(templates: Iterable[str]) -> set[str]:
    """Every placeholder name the templates use."""
    return {name for template in templates for name in fields(template)}


def substitute(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each placeholder replaced by ``values[name]``; ``PlaceholderError``
    as ``fields`` does, or for a known name ``values`` lacks."""
    out = []
    for literal, field, _spec, _conversion in _parse(template):
        out.append(literal)
        if field is not None:
            if field not in values:
                raise PlaceholderError(f"{{{field}}} has no value here")
            out.append(values[field])
    return "".join(out)


def _parse(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    fields(template)  # raises for what substitution would not understand
    return list(_FORMATTER.parse(template))
