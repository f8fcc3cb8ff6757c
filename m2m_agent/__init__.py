"""m2m-agent: short-lived Clerk machine-to-machine tokens, always ready for your workers.

Everything public is importable from here; submodules ``m2m_agent.errors``,
``m2m_agent.emulator`` (and, as they land, ``m2m_agent.stores`` and ``m2m_agent.verify``) hold the
rest.
"""

from __future__ import annotations

import contextlib

from m2m_agent._async_manager import AsyncTokenManager as AsyncTokenManager
from m2m_agent._auth import M2MAuth as M2MAuth
from m2m_agent._client import AsyncClerkM2MClient as AsyncClerkM2MClient
from m2m_agent._client import ClerkM2MClient as ClerkM2MClient
from m2m_agent._policy import RefreshPolicy as RefreshPolicy
from m2m_agent._refresh import Statistics as Statistics
from m2m_agent._refresh import TokenState as TokenState
from m2m_agent._sync_manager import TokenManager as TokenManager
from m2m_agent._token import M2MToken as M2MToken
from m2m_agent._token import M2MTokenList as M2MTokenList
from m2m_agent._token import TokenFormat as TokenFormat
from m2m_agent._version import __version__ as __version__
from m2m_agent.errors import AuthenticationError as AuthenticationError
from m2m_agent.errors import BadRequestError as BadRequestError
from m2m_agent.errors import ClerkAPIError as ClerkAPIError
from m2m_agent.errors import ConfigurationError as ConfigurationError
from m2m_agent.errors import InvalidTokenError as InvalidTokenError
from m2m_agent.errors import M2MAgentError as M2MAgentError
from m2m_agent.errors import MalformedResponseError as MalformedResponseError
from m2m_agent.errors import NotFoundError as NotFoundError
from m2m_agent.errors import PermissionDeniedError as PermissionDeniedError
from m2m_agent.errors import RateLimitError as RateLimitError
from m2m_agent.errors import ServerError as ServerError
from m2m_agent.errors import StoreError as StoreError
from m2m_agent.errors import TokenUnavailableError as TokenUnavailableError
from m2m_agent.errors import TransportError as TransportError
from m2m_agent.verify import AsyncTokenVerifier as AsyncTokenVerifier
from m2m_agent.verify import TokenVerifier as TokenVerifier
from m2m_agent.verify import VerifiedToken as VerifiedToken

__all__ = [
    "AsyncClerkM2MClient",
    "AsyncTokenManager",
    "AsyncTokenVerifier",
    "AuthenticationError",
    "BadRequestError",
    "ClerkAPIError",
    "ClerkM2MClient",
    "ConfigurationError",
    "InvalidTokenError",
    "M2MAgentError",
    "M2MAuth",
    "M2MToken",
    "M2MTokenList",
    "MalformedResponseError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RefreshPolicy",
    "ServerError",
    "Statistics",
    "StoreError",
    "TokenFormat",
    "TokenManager",
    "TokenState",
    "TokenUnavailableError",
    "TokenVerifier",
    "TransportError",
    "VerifiedToken",
    "__version__",
]

# Show public names as m2m_agent.X (not m2m_agent._client.X) in reprs, tracebacks and docs.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("m2m_agent._"):
        with contextlib.suppress(AttributeError, TypeError):  # typing aliases refuse
            _obj.__module__ = __name__
del _name, _obj
