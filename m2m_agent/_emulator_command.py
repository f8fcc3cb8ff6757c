"""``m2m-agent emulator``: serve the Clerk M2M emulator on loopback until interrupted."""

from __future__ import annotations

import argparse
import json
import os
import threading
from typing import TextIO

from m2m_agent._config import is_loopback_host
from m2m_agent.errors import ConfigurationError

__all__ = ["ENV_EMULATOR_KEY", "serve_emulator"]

ENV_EMULATOR_KEY = "M2M_AGENT_EMULATOR_KEY"
"""A fixed machine secret key for the default machine, so scripts can know it in advance."""


def serve_emulator(
    args: argparse.Namespace, out: TextIO, *, stop: threading.Event | None = None
) -> int:
    """Serve until interrupted (or ``stop`` is set); print the URL and the machines' keys."""
    from m2m_agent.emulator import Emulator

    if not is_loopback_host(args.host):
        raise ConfigurationError(
            f"--host {args.host!r} is not a loopback address: the emulator hands out keys to "
            "anyone who asks, so it only listens on this machine (127.0.0.1 or ::1)."
        )
    specs = args.machine or [
        f"worker={os.environ[ENV_EMULATOR_KEY]}" if os.environ.get(ENV_EMULATOR_KEY) else "worker"
    ]
    emulator = Emulator()
    machines = []
    for spec in specs:
        name, _, key = spec.partition("=")
        if key and not key.startswith("ak_"):
            raise ConfigurationError(f"--machine {name}=...: a machine key must start with 'ak_'.")
        machines.append(emulator.create_machine(name or "worker", secret_key=key or None))
    for machine in machines:
        for other in machines:
            emulator.add_scope(machine.id, other.id)
    try:
        server_context = emulator.serve(host=args.host, port=args.port)
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            f"Serving the emulator needs the 'emulator' extra: pip install 'm2m-agent[emulator]' "
            f"({exc})."
        ) from None
    with server_context as server:
        if args.json:
            settings = {
                "url": server.url,
                "instance_secret_key": emulator.instance_secret_key,
                "machines": [
                    {"name": m.name, "id": m.id, "secret_key": m.secret_key} for m in machines
                ],
            }
            out.write(json.dumps(settings) + "\n")
        else:
            out.write(f"Clerk M2M emulator listening on {server.url}\n")
            out.write(f"  export CLERK_API_URL={server.url}\n")
            for m in machines:
                out.write(f"  machine {m.name} ({m.id}):\n")
                out.write(f"    export CLERK_MACHINE_SECRET_KEY={m.secret_key}\n")
            out.write(f"  instance secret key (JWKS): {emulator.instance_secret_key}\n")
            out.write("These keys are local test keys. Press Ctrl-C to stop.\n")
        out.flush()
        (stop or threading.Event()).wait()
    return 0
