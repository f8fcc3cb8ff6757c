"""A griffe extension for the docs build: render Sphinx roles in docstrings as inline code.

Some docstrings in ``m2m_agent`` use Sphinx roles (``:class:`RefreshPolicy```,
``:meth:`~m2m_agent.X.y```), which mkdocstrings would show verbatim. This turns each into inline
code (``RefreshPolicy``, ``y`` for a ``~`` target), at build time only; the sources are untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|exc|mod|obj|data|const):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles as inline code in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the docstrings of the package once it is loaded."""
        _rewrite(pkg)


def _rewrite(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
    for member in obj.members.values():
        if isinstance(member, griffe.Object):  # aliases point at objects rewritten elsewhere
            _rewrite(member)
