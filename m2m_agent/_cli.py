"""The ``m2m-agent`` command line.

Commands: ``demo``, ``emulator``, ``token``, ``exec``, ``verify``, ``revoke``, ``list``.

Exit codes a shell user can act on:

- 0: done;
- 1: Clerk said no (an invalid token, a refused request);
- 2: a usage or configuration mistake (the message says what to fix);
- 3: Clerk could not be reached, or no token could be had in time;
- 126: ``exec`` could not run the command (not executable);
- 130: interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import structlog

from m2m_agent import _version
from m2m_agent._client import ClerkM2MClient
from m2m_agent._sync_manager import TokenManager
from m2m_agent._token import M2MToken
from m2m_agent.errors import (
    ClerkAPIError,
    ConfigurationError,
    InvalidTokenError,
    M2MAgentError,
    StoreError,
    TokenUnavailableError,
    TransportError,
)

__all__ = ["main"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CANNOT_EXECUTE = 126
EXIT_INTERRUPTED = 130


def token_to_json(token: M2MToken) -> dict[str, Any]:
    """The token's public fields as JSON (never the secret)."""
    return {
        "id": token.id,
        "subject": token.subject,
        "scopes": list(token.scopes),
        "claims": token.claims,
        "format": token.format,
        "revoked": token.revoked,
        "revocation_reason": token.revocation_reason,
        "expired": token.expired,
        "expiration": token.expiration.isoformat() if token.expiration else None,
        "created_at": token.created_at.isoformat() if token.created_at else None,
    }


def _client(args: argparse.Namespace) -> ClerkM2MClient:
    return ClerkM2MClient(args.key, api_url=args.api_url)


def _read_token(value: str, stdin: TextIO) -> str:
    return stdin.readline().strip() if value == "-" else value


def _cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        token = client.verify_token(_read_token(args.token, sys.stdin))
    out.write(json.dumps(token_to_json(token), indent=2) + "\n")
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        token = client.revoke_token(args.token_id, reason=args.reason)
    out.write(json.dumps(token_to_json(token), indent=2) + "\n")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        page = client.list_tokens(
            subject=args.subject,
            revoked=args.revoked,
            expired=args.expired,
            limit=args.limit,
            offset=args.offset,
        )
    out.write(
        json.dumps(
            {"total_count": page.total_count, "tokens": [token_to_json(t) for t in page]},
            indent=2,
        )
        + "\n"
    )
    return EXIT_OK


def _token_manager(args: argparse.Namespace) -> TokenManager:
    """A manager that reuses a token across runs through a FileStore (unless --no-cache)."""
    from m2m_agent.stores import FileStore, MemoryStore

    store = MemoryStore() if args.no_cache else FileStore(args.cache)
    return TokenManager(
        machine_secret_key=args.key,
        api_url=args.api_url,
        lifetime=args.lifetime,
        token_format=args.format,
        store=store,
        revoke_on_close=False,
    )


def _cmd_token(args: argparse.Namespace, out: TextIO) -> int:
    with _token_manager(args) as manager:
        token = manager.get_token()
        stats = manager.statistics()
    if args.json:
        expires_in = stats.seconds_to_expiry
        payload = {
            "token": token,
            "token_id": stats.token_id,
            "expires_in": round(expires_in, 3) if expires_in is not None else None,
            "minted": stats.mints > 0,
        }
        out.write(json.dumps(payload) + "\n")
    else:
        out.write(token + "\n")
    return EXIT_OK


def _cmd_exec(args: argparse.Namespace, out: TextIO) -> int:
    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigurationError("exec needs a command: m2m-agent exec -- CMD [ARGS...]")
    with _token_manager(args) as manager:
        token = manager.get_token()
    env = {**os.environ, args.env_var: token}
    try:
        return subprocess.call(command, env=env)  # noqa: S603 - the user's own command
    except FileNotFoundError:
        raise ConfigurationError(f"exec: command not found: {command[0]}") from None
    except OSError as exc:  # not executable, a directory...
        sys.stderr.write(f"m2m-agent exec: cannot run {command[0]}: {exc.strerror or exc}\n")
        return EXIT_CANNOT_EXECUTE


def _add_token_options(parser: argparse.ArgumentParser) -> None:
    _add_api_options(parser)
    parser.add_argument(
        "--lifetime", type=float, default=3600.0, help="token lifetime in seconds (default 3600)"
    )
    parser.add_argument(
        "--format", choices=["opaque", "jwt"], default="opaque", help="token format"
    )
    parser.add_argument(
        "--cache",
        default=None,
        metavar="PATH",
        help="token cache file (mode 0600), shared by runs on this host; default "
        "$XDG_CACHE_HOME/m2m-agent/tokens.json",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="always mint a fresh token (costs a mint per run)"
    )


def _cmd_emulator(args: argparse.Namespace, out: TextIO) -> int:
    from m2m_agent._emulator_command import serve_emulator

    return serve_emulator(args, out)


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from m2m_agent._demo import run_demo

    return run_demo(args, out)


def _add_api_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key",
        default=None,
        help="machine secret key (ak_...); default: $CLERK_MACHINE_SECRET_KEY. Prefer the "
        "environment variable: arguments show up in `ps`.",
    )
    parser.add_argument(
        "--api-url",
        default=None,
        help="Backend API URL; default: $CLERK_API_URL, else https://api.clerk.com",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``m2m-agent``."""
    parser = argparse.ArgumentParser(
        prog="m2m-agent",
        description="Clerk machine-to-machine tokens for workers, cron jobs and shell scripts.",
        epilog="Exit codes: 0 ok, 1 refused by Clerk, 2 usage or configuration error, "
        "3 Clerk unreachable, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version.__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log to stderr: -v lifecycle events (mints, refreshes), -vv every API call",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="see it work: workers, refreshes, rotations and an outage, live (embedded emulator)",
        description="Run the main job live on the embedded Clerk emulator (no account, no "
        "network): workers call a protected service through M2MAuth with short-lived tokens "
        "that are refreshed and rotated, while the token endpoint goes down for a while "
        "halfway. Exits 1 if any request failed. With --real and CLERK_MACHINE_SECRET_KEY, "
        "runs against Clerk itself (no outage; the machine must be in its own token scopes "
        "for the service side to verify).",
    )
    demo.add_argument("--duration", type=float, default=20.0, help="seconds to run (default 20)")
    demo.add_argument(
        "--lifetime", type=float, default=8.0, help="token lifetime in seconds (default 8)"
    )
    demo.add_argument("--workers", type=int, default=4, help="concurrent workers (default 4)")
    demo.add_argument("--json", action="store_true", help="print one JSON summary")
    demo.add_argument("--no-outage", action="store_true", help="skip the injected outage")
    demo.add_argument(
        "--real", action="store_true", help="use Clerk itself ($CLERK_MACHINE_SECRET_KEY)"
    )
    demo.set_defaults(handler=_cmd_demo)

    emulator = commands.add_parser(
        "emulator",
        help="serve the local Clerk M2M API emulator over HTTP on loopback",
        description="Serve the Clerk M2M API emulator on loopback until interrupted, printing "
        "the URL and a machine secret key to use with it.",
    )
    emulator.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    emulator.add_argument("--port", type=int, default=8787, help="port (0 picks a free one)")
    emulator.add_argument(
        "--machine",
        action="append",
        default=None,
        metavar="NAME[=ak_KEY]",
        help="create a machine (repeatable), optionally with a fixed key; default: one machine "
        "'worker' whose key is $M2M_AGENT_EMULATOR_KEY or random. Every machine may verify "
        "every other's tokens.",
    )
    emulator.add_argument("--json", action="store_true", help="print the settings as JSON")
    emulator.set_defaults(handler=_cmd_emulator)

    token = commands.add_parser(
        "token",
        help="print a valid token (reusing a cached one), for shell scripts and cron",
        description="Print an M2M token with comfortably more than the safety margin left. "
        "Runs on one host share one cached token (a private file), so a job run every minute "
        "mints about once per token lifetime. The token is never revoked by this command.",
    )
    _add_token_options(token)
    token.add_argument(
        "--json", action="store_true", help="print {token, token_id, expires_in, minted}"
    )
    token.set_defaults(handler=_cmd_token)

    execute = commands.add_parser(
        "exec",
        help="run a command with a valid token in its environment",
        description="Run CMD with a valid token in $CLERK_M2M_TOKEN (see --env-var); exits with "
        "CMD's exit code. The token is not put on the command line, where `ps` would show it.",
    )
    _add_token_options(execute)
    execute.add_argument(
        "--env-var", default="CLERK_M2M_TOKEN", help="variable to put the token in"
    )
    execute.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    execute.set_defaults(handler=_cmd_exec)

    verify = commands.add_parser(
        "verify",
        help="verify a token with Clerk and print its fields",
        description="Ask Clerk whether TOKEN is valid for this machine; prints its public "
        "fields as JSON. Exit 1 if it is not.",
    )
    verify.add_argument("token", help="the token to verify, or - to read it from stdin")
    _add_api_options(verify)
    verify.set_defaults(handler=_cmd_verify)

    revoke = commands.add_parser(
        "revoke",
        help="revoke an opaque token by id",
        description="Revoke the opaque token TOKEN_ID (mt_ + 32 hex); JWTs cannot be revoked.",
    )
    revoke.add_argument("token_id", help="the token id (mt_...), not the token itself")
    revoke.add_argument("--reason", default=None, help="revocation reason to record")
    _add_api_options(revoke)
    revoke.set_defaults(handler=_cmd_revoke)

    listing = commands.add_parser(
        "list",
        help="list a machine's opaque tokens",
        description="List the stored (opaque) tokens of machine SUBJECT, newest first.",
    )
    listing.add_argument("subject", help="machine id (mch_...)")
    listing.add_argument("--revoked", action="store_true", help="include revoked tokens")
    listing.add_argument("--expired", action="store_true", help="include expired tokens")
    listing.add_argument("--limit", type=int, default=10, help="page size, 1 to 100")
    listing.add_argument("--offset", type=int, default=0, help="tokens to skip")
    _add_api_options(listing)
    listing.set_defaults(handler=_cmd_list)
    return parser


def _configure_logging(verbosity: int) -> None:
    """The CLI is an application: it, not the library, decides where log events go (stderr)."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run ``m2m-agent``; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    # The demo shows failures ridden out on screen: their warnings would only repeat it.
    _configure_logging(args.verbose or (-1 if args.command == "demo" else 0))
    handler: Callable[[argparse.Namespace, TextIO], int] = args.handler
    err = sys.stderr
    try:
        return handler(args, out or sys.stdout)
    except (ConfigurationError, StoreError) as exc:
        err.write(f"m2m-agent {args.command}: configuration error: {exc}\n")
        return EXIT_USAGE
    except (TransportError, TokenUnavailableError) as exc:
        err.write(f"m2m-agent {args.command}: {exc}\n")
        return EXIT_UNREACHABLE
    except InvalidTokenError as exc:
        err.write(f"m2m-agent {args.command}: invalid token ({exc.reason}): {exc}\n")
        return EXIT_REFUSED
    except ClerkAPIError as exc:
        err.write(f"m2m-agent {args.command}: {exc}\n")
        return EXIT_REFUSED
    except M2MAgentError as exc:  # pragma: no cover - every subclass is handled above
        err.write(f"m2m-agent {args.command}: {exc}\n")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        err.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
