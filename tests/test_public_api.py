"""The public surface: one namespace, sorted ``__all__``, a docstring on every public name."""

from __future__ import annotations

import importlib
import inspect

import pytest

import m2m_agent

PUBLIC_MODULES = [
    "m2m_agent",
    "m2m_agent.errors",
    "m2m_agent.emulator",
    "m2m_agent.httpx2",
    "m2m_agent.stores",
    "m2m_agent.verify",
    "m2m_agent.asgi",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_and_complete(name):
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported)
    for attribute in exported:
        assert hasattr(module, attribute), attribute


@pytest.mark.parametrize("name", PUBLIC_MODULES)
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
        if inspect.isclass(obj):  # inherited public methods count too
            for klass in obj.__mro__[:-1]:
                for member, value in vars(klass).items():
                    if member.startswith("_") or not callable(value):
                        continue
                    if not inspect.getdoc(value):
                        undocumented.append(f"{attribute}.{member}")
    assert undocumented == []


def test_public_classes_show_the_public_path():
    assert m2m_agent.TokenManager.__module__ == "m2m_agent"
    assert repr(m2m_agent.ClerkM2MClient) == "<class 'm2m_agent.ClerkM2MClient'>"


def test_errors_are_re_exported():
    from m2m_agent import errors

    for name in errors.__all__:
        assert getattr(m2m_agent, name) is getattr(errors, name)


def test_version():
    assert m2m_agent.__version__


def test_manager_faces_match():
    """TokenManager and AsyncTokenManager cannot drift: same methods, same parameters."""
    import inspect as i

    lifecycle = {"close", "aclose"}
    sync = {n for n in dir(m2m_agent.TokenManager) if not n.startswith("_")} - lifecycle
    async_ = {n for n in dir(m2m_agent.AsyncTokenManager) if not n.startswith("_")} - lifecycle
    assert sync == async_
    for name in sync:
        s = getattr(m2m_agent.TokenManager, name)
        a = getattr(m2m_agent.AsyncTokenManager, name)
        if callable(s):
            assert list(i.signature(s).parameters) == list(i.signature(a).parameters), name
    assert list(i.signature(m2m_agent.TokenManager).parameters) == list(
        i.signature(m2m_agent.AsyncTokenManager).parameters
    )
