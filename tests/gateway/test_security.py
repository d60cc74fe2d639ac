"""Per-call media stream tokens: only the call the webhook named, under the deployment's secret."""

from __future__ import annotations

from app.config import GatewaySettings
from app.gateway.security import StreamTokens


def settings(**values: str) -> GatewaySettings:
    return GatewaySettings(redis_url="unix:///nonexistent", **values)


def test_a_token_opens_only_the_call_it_was_issued_for() -> None:
    tokens = StreamTokens(settings(twilio_auth_token="auth-token-1"))
    token = tokens.issue("CA0001")
    assert tokens.check("CA0001", token)
    assert not tokens.check("CA0002", token)  # a made-up or other call id
    assert not tokens.check("CA0001", token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert not tokens.check("CA0001", None) and not tokens.check("CA0001", "") and not tokens.check("CA0001", "x" * 10_000)


def test_every_gateway_of_a_deployment_agrees_and_another_deployment_does_not() -> None:
    """The key comes from STREAM_TOKEN_SECRET or the Twilio auth token, so any gateway can check."""
    a, b = StreamTokens(settings(twilio_auth_token="auth-token-1")), StreamTokens(settings(twilio_auth_token="auth-token-1"))
    assert b.check("CA1", a.issue("CA1"))
    assert not StreamTokens(settings(twilio_auth_token="auth-token-2")).check("CA1", a.issue("CA1"))
    secret = settings(twilio_auth_token="auth-token-1", stream_token_secret="s" * 32)
    assert StreamTokens(secret).issue("CA1") != a.issue("CA1")
    assert StreamTokens(secret).check("CA1", StreamTokens(secret).issue("CA1"))


def test_without_any_secret_tokens_still_bind_the_call_in_this_process() -> None:
    tokens = StreamTokens(settings())
    assert tokens.check("web-1", tokens.issue("web-1"))
    assert not StreamTokens(settings()).check("web-1", tokens.issue("web-1"))
