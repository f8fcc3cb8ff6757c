"""The ``m2m-agent`` command as a shell user runs it: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from m2m_agent import ClerkM2MClient

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "m2m_agent"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})}
    )


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, Any]]:
    """``m2m-agent emulator`` in the background, with two machines that may verify each other."""
    with subprocess.Popen(
        [*CLI, "emulator", "--port", "0", "--json", "--machine", "worker", "--machine", "service"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            settings = json.loads(process.stdout.readline())
            yield settings
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(10)
    assert process.returncode == 130


def env_for(settings: dict[str, Any], machine: int = 0) -> dict[str, str]:
    return {
        "CLERK_API_URL": settings["url"],
        "CLERK_MACHINE_SECRET_KEY": settings["machines"][machine]["secret_key"],
    }


class TestHelp:
    @pytest.mark.parametrize(
        "command", [[], ["demo"], ["emulator"], ["verify"], ["revoke"], ["list"]]
    )
    def test_every_command_has_help(self, command):
        result = run(*command, "--help")
        assert result.returncode == 0
        assert "usage: m2m-agent" in result.stdout

    def test_no_command_is_a_usage_error(self):
        result = run()
        assert result.returncode == 2
        assert "COMMAND" in result.stderr


class TestDemo:
    def test_demo_json(self):
        """The README's main command, shortened: requests flow through rotations and an
        outage with no failure, and the JSON summary says so."""
        result = run("demo", "--json", "--duration", "6", "--lifetime", "3", "--workers", "3")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["ok"] is True
        assert summary["failures"] == 0
        assert summary["requests"] > 100
        assert summary["mints"] >= 3, "tokens were rotated"
        assert summary["mints"] == summary["refreshes"] + 1
        assert summary["outage_seconds"] > 0
        assert summary["refresh_failures"] >= 1, "the outage was ridden out"
        assert summary["revocations"] >= 1
        assert summary["api_calls"]["create"] == summary["mints"] + summary["refresh_failures"]

    def test_demo_human(self):
        result = run("demo", "--duration", "3", "--lifetime", "2", "--workers", "1")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "PASS: " in result.stdout
        assert "rotated to mt_" in result.stdout
        assert result.stderr == "", "nothing logged below ERROR in the demo without -v"

    def test_demo_bad_arguments(self):
        result = run("demo", "--lifetime", "0.5")
        assert result.returncode == 2
        assert "--lifetime" in result.stderr

    def test_real_without_a_key_says_what_to_do(self):
        result = run("demo", "--real")
        assert result.returncode == 2
        assert "CLERK_MACHINE_SECRET_KEY" in result.stderr


class TestAgainstTheServedEmulator:
    def test_verify_list_revoke(self, served):
        worker, _service = served["machines"]
        with ClerkM2MClient(worker["secret_key"], api_url=served["url"]) as client:
            minted = client.create_token(seconds_until_expiration=60)
        assert minted.token
        result = subprocess.run(
            [*CLI, "verify", "-"],
            input=minted.token + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env_for(served, 1)},
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["id"] == minted.id
        assert minted.token not in result.stdout

        listed = run("list", worker["id"], env=env_for(served, 0))
        assert listed.returncode == 0, listed.stderr
        assert minted.id in [t["id"] for t in json.loads(listed.stdout)["tokens"]]

        revoked = run("revoke", minted.id, "--reason", "cli test", env=env_for(served, 0))
        assert revoked.returncode == 0, revoked.stderr
        assert json.loads(revoked.stdout)["revocation_reason"] == "cli test"

        again = run("verify", minted.token, env=env_for(served, 1))
        assert again.returncode == 1
        assert "404" in again.stderr

    def test_missing_key_is_exit_2(self, served):
        result = run("list", served["machines"][0]["id"], env={"CLERK_API_URL": served["url"]})
        assert result.returncode == 2
        assert "CLERK_MACHINE_SECRET_KEY" in result.stderr

    def test_instance_key_is_explained(self, served):
        result = run(
            "list",
            served["machines"][0]["id"],
            env={"CLERK_API_URL": served["url"], "CLERK_MACHINE_SECRET_KEY": "sk_test_abcdefgh"},
        )
        assert result.returncode == 2
        assert "instance secret key" in result.stderr
        assert "sk_test_abcdefgh" not in result.stderr

    def test_revoke_takes_an_id_not_a_token(self, served):
        result = run("revoke", "mt_" + "x" * 48, env=env_for(served))
        assert result.returncode == 2
        assert "token id" in result.stderr


def test_unreachable_api_is_exit_3():
    result = run(
        "verify",
        "mt_whatever",
        env={
            "CLERK_API_URL": "http://127.0.0.1:9",
            "CLERK_MACHINE_SECRET_KEY": "ak_test_" + "a" * 32,
        },
    )
    assert result.returncode == 3
    assert "Could not reach" in result.stderr


def test_emulator_refuses_a_public_address():
    result = run("emulator", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "loopback" in result.stderr


def test_exec_of_a_command_that_cannot_run_is_exit_126(tmp_path):
    from m2m_agent.emulator import Emulator

    emulator = Emulator()
    machine = emulator.create_machine("worker")
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o600)  # not executable
    with emulator.serve() as server:
        result = run(
            "exec",
            "--no-cache",
            "--",
            str(script),
            env={"CLERK_API_URL": server.url, "CLERK_MACHINE_SECRET_KEY": machine.secret_key},
        )
    assert result.returncode == 126
    assert "cannot run" in result.stderr
