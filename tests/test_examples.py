"""Every script in ``examples/`` runs, on the embedded emulator, and prints what it promises.

Parametrized over the glob: a new example is picked up with no change here (it must exit 0 and
print something); the ones listed in ``EXPECTED`` must also print those lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED: dict[str, list[str]] = {
    "sync_httpx.py": [
        "GET /reports -> 200",
        "3 calls, 1 mint",
        "it is fresh",
        "manager closed: its token is revoked",
    ],
    "async_httpx.py": ["GET /jobs/4 -> 200", "5 concurrent calls, 1 mint", "done on asyncio"],
    "async_httpx.py trio": ["GET /jobs/4 -> 200", "5 concurrent calls, 1 mint", "done on trio"],
    "api_client.py": [
        "created  <M2MToken mt_",
        "verified mt_",
        "listed   1 live token(s)",
        "revoked  mt_",
        "verify after revoke -> NotFoundError (HTTP 404)",
        "listed   0 live token(s), 1 with revoked ones",
    ],
    "emulator_pytest.py": ["3 passed"],
}
"""Lines each run must print, keyed by the file name and any arguments."""

RUNS = sorted(
    {path.name for path in EXAMPLES.glob("*.py")} | {key for key in EXPECTED if " " in key}
)


def test_examples_exist() -> None:
    assert {"sync_httpx.py", "async_httpx.py", "api_client.py", "emulator_pytest.py"} <= set(RUNS)
    missing = {key.split()[0] for key in EXPECTED} - {path.name for path in EXAMPLES.glob("*.py")}
    assert not missing, f"EXPECTED names examples that do not exist: {missing}"


@pytest.mark.integration
@pytest.mark.parametrize("run", RUNS)
def test_example_runs(run: str, tmp_path: Path) -> None:
    """The example exits 0 on the emulator, prints its lines, and never a machine secret key."""
    name, *args = run.split()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}  # never real Clerk
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert result.stdout.strip(), f"{name} printed nothing"
    for line in EXPECTED.get(run, []):
        assert line in result.stdout, f"{run!r} did not print {line!r}:\n{output}"
    assert "ak_" not in output, "an example printed a machine secret key"
