"""The receiving side's public surface: ``m2m_agent.verify`` and ``m2m_agent.asgi``."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = ["m2m_agent.verify", "m2m_agent.asgi"]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_complete(name):
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported)
    for attribute in exported:
        assert hasattr(module, attribute), attribute


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_is_documented(name):
    module = importlib.import_module(name)
    assert inspect.getdoc(module)
    undocumented = []
    for attribute in module.__all__:
        obj = getattr(module, attribute)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not inspect.getdoc(obj):
            undocumented.append(attribute)
        if inspect.isclass(obj):
            for klass in obj.__mro__[:-1]:
                for member, value in vars(klass).items():
                    if member.startswith("_") or not callable(value):
                        continue
                    if not inspect.getdoc(value):
                        undocumented.append(f"{attribute}.{member}")
    assert undocumented == []


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
