"""Key and URL hygiene at construction: every mistake is a ConfigurationError saying what to fix."""

from __future__ import annotations

import pytest

from m2m_agent import AsyncClerkM2MClient, ClerkM2MClient, ConfigurationError
from m2m_agent._config import is_loopback_host, resolve_api_url, resolve_machine_secret_key

GOOD_KEY = "ak_test_0123456789abcdef0123456789abcdef"


class TestMachineSecretKey:
    def test_missing_key_names_the_argument_and_the_variable(self, monkeypatch):
        """No argument and no environment variable: the message says how to provide one."""
        monkeypatch.delenv("CLERK_MACHINE_SECRET_KEY", raising=False)
        with pytest.raises(ConfigurationError, match="CLERK_MACHINE_SECRET_KEY"):
            ClerkM2MClient()

    def test_key_from_environment(self, monkeypatch):
        """The key falls back to CLERK_MACHINE_SECRET_KEY."""
        monkeypatch.setenv("CLERK_MACHINE_SECRET_KEY", GOOD_KEY)
        with ClerkM2MClient() as client:
            assert client.key_fingerprint == resolve_machine_secret_key(GOOD_KEY).fingerprint

    @pytest.mark.parametrize(
        ("key", "hint"),
        [
            ("sk_test_abcdefabcdefabcdef", "instance secret key"),
            ("pk_test_abcdefabcdefabcdef", "publishable key"),
            ("mt_0123456789abcdef0123456789abcdef", "looks like an M2M token"),
            ("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtY2gifQ.c2ln", "looks like an M2M token"),
            ("hunter2hunter2", "must start with 'ak_'"),
            (f" {GOOD_KEY}", "whitespace"),
            (f"{GOOD_KEY}\n", "whitespace"),
            ("ak_has space", "malformed"),
            ('ak_"quoted"', "malformed"),
            ("ak_", "malformed"),
            ("", "empty"),
        ],
    )
    def test_wrong_keys_are_refused_with_a_hint(self, key, hint):
        """Each wrong kind of key gets its own explanation, and the message never echoes it."""
        with pytest.raises(ConfigurationError, match=hint) as info:
            resolve_machine_secret_key(key)
        if len(key.strip()) > 4:
            assert key.strip() not in str(info.value)

    def test_non_string_key(self):
        with pytest.raises(ConfigurationError, match="must be a str"):
            resolve_machine_secret_key(1234)  # type: ignore[arg-type]

    def test_configuration_error_is_a_value_error(self):
        """Code that catches ValueError for bad arguments keeps working."""
        with pytest.raises(ValueError, match="ak_"):
            resolve_machine_secret_key("nope_nope_nope")


class TestApiUrl:
    def test_default_is_clerk(self, monkeypatch):
        monkeypatch.delenv("CLERK_API_URL", raising=False)
        assert str(resolve_api_url(None)) == "https://api.clerk.com/"

    def test_environment_fallback_keeps_a_path_prefix(self, monkeypatch):
        monkeypatch.setenv("CLERK_API_URL", "https://api.clerk.com/v1/")
        assert str(resolve_api_url(None)) == "https://api.clerk.com/v1"

    @pytest.mark.parametrize(
        "url", ["http://127.0.0.1:8787", "http://localhost:1", "http://[::1]:2", "http://127.9.9.9"]
    )
    def test_plain_http_to_loopback_is_fine(self, url):
        assert resolve_api_url(url).scheme == "http"

    def test_plain_http_to_a_remote_host_is_refused(self):
        """Sending the machine key in clear text needs an explicit opt-in."""
        with pytest.raises(ConfigurationError, match="allow_insecure_http"):
            resolve_api_url("http://api.example.com")
        assert resolve_api_url("http://api.example.com", allow_insecure_http=True).host

    @pytest.mark.parametrize(
        "url",
        ["api.clerk.com", "ftp://api.clerk.com", "https://", "https://u:p@api.clerk.com", "::"],
    )
    def test_malformed_urls(self, url):
        with pytest.raises(ConfigurationError) as info:
            resolve_api_url(url)
        assert ":p@" not in str(info.value)

    def test_the_async_client_checks_the_same(self):
        with pytest.raises(ConfigurationError, match="allow_insecure_http"):
            AsyncClerkM2MClient(GOOD_KEY, api_url="http://clerk.example.com")

    @pytest.mark.parametrize(
        ("host", "loopback"),
        [
            ("localhost", True),
            ("api.localhost", True),
            ("127.0.0.1", True),
            ("::1", True),
            ("[::1]", True),
            ("10.0.0.1", False),
            ("example.com", False),
            ("localhost.example.com", False),
        ],
    )
    def test_is_loopback_host(self, host, loopback):
        assert is_loopback_host(host) is loopback
