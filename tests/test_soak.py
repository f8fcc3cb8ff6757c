"""Soak, short: thousands of requests across many rotations, with resources flat and the
statistics adding up. The long version is ``python bench/soak.py --seconds 600`` (see
docs/reliability.md for its figures)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def load_bench(name: str) -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"m2m_bench_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


soak = load_bench("soak")


@pytest.mark.parametrize(
    ("anyio_backend", "seconds", "revoke_on_close"),
    [("asyncio", 8.0, True), ("trio", 4.0, False)],
    ids=["asyncio-revoke-on-close", "trio-keep-on-close"],
)
async def test_soak(anyio_backend, seconds, revoke_on_close):
    """Both faces, entered, 1 s tokens, API over loopback TCP, requests as fast as 4 workers
    go: no failed request; fds, threads and tasks flat and back to baseline after close; traced
    memory flat; mints == refreshes + 1, revocations == mints (or mints - 1 when the last token
    is kept), and the emulator's own list agrees."""
    config = soak.SoakConfig(
        seconds=seconds,
        warmup_seconds=2.0,
        lifetime=1.0,
        sample_seconds=1.0,
        trace_memory=True,
        revoke_on_close=revoke_on_close,
    )
    report = await soak.run_soak(config)
    problems = soak.check(report, config)
    assert not problems, "\n".join(problems)
    for face, f in report["faces"].items():
        assert f["statistics"]["mints"] >= seconds, f"{face}: too few rotations to mean much"
    assert sum(report["requests"].values()) >= 300 * seconds
    assert report["peak"]["m2m_threads"] <= 2, "a refresher and at most one mint thread"
    assert report["after_close"]["m2m_threads"] == 0
    # A leak of even 50 bytes a request would show as ~500 KiB here.
    assert report["growth"]["traced_kib"] < 256, report["growth"]
    assert report["bytes_per_request_traced"] < 25, report
