"""The receiving side's public surface: ``m2m_agent.verify`` and ``m2m_agent.asgi``."""

from __future__ import annotations

import inspect

# __all__ and docstrings of these modules are checked in test_public_api.py.


def test_public_classes_show_the_public_path():
    from m2m_agent.verify import VerifiedToken

    assert VerifiedToken.__module__ == "m2m_agent.verify"


def test_faces_have_the_same_methods_and_arguments():
    """The sync and async verifiers cannot drift: same public methods, same keyword arguments."""
    from m2m_agent.verify import AsyncTokenVerifier, TokenVerifier

    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")}

    assert public(TokenVerifier) - {"close"} == public(AsyncTokenVerifier) - {"aclose"}
    sync = inspect.signature(TokenVerifier)
    async_ = inspect.signature(AsyncTokenVerifier)
    assert list(sync.parameters) == list(async_.parameters)
    for name, parameter in sync.parameters.items():
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameter.default == async_.parameters[name].default, name
    assert inspect.iscoroutinefunction(AsyncTokenVerifier.verify)
    assert not inspect.iscoroutinefunction(TokenVerifier.verify)
