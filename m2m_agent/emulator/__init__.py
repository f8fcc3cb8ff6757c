"""A faithful local emulator of Clerk's machine-to-machine (M2M) token Backend API.

Use it in tests in-process (:meth:`Emulator.transport`, :meth:`Emulator.async_transport`), as
an ASGI app (:attr:`Emulator.asgi_app`), or over loopback TCP (:meth:`Emulator.serve`), where
the official Clerk SDKs can talk to it. Inject failures with :class:`Fault`; read what was
served from :attr:`Emulator.counters`.
"""

from __future__ import annotations

from ._emulator import Emulator as Emulator
from ._faults import Fault as Fault
from ._records import Counters as Counters
from ._records import Machine as Machine
from ._records import Outcome as Outcome
from ._records import TokenRecord as TokenRecord
from ._server import EmulatorServer as EmulatorServer

__all__ = ["Counters", "Emulator", "EmulatorServer", "Fault", "Machine", "Outcome", "TokenRecord"]
