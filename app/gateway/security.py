"""Request authentication: Twilio's X-Twilio-Signature, per-call stream tokens, the admin bearer token.

Twilio signs the URL it requested (the public one, so `PUBLIC_URL` must be set behind a proxy or
tunnel) plus the sorted POST parameters. For the media stream it signs the WebSocket upgrade: the
`wss://` URL from the TwiML `<Stream url>` with no parameters (the `https://` spelling of the same
URL is accepted too).

That signature is the same for every call (the URL has no per-call part), so on its own a captured
upgrade would open streams forever. The webhook therefore hands each call a stream token, an HMAC
of the call id (`StreamTokens`), as a `<Parameter>`; the stream is accepted only with the token of
a call the webhook created, and only while that record is still ringing (once).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException, Request, WebSocket, status
from starlette.datastructures import URL
from twilio.request_validator import SIGNATURE_SETTINGS_HEADER, RequestValidator, get_signature_algorithm

from app.config import GatewaySettings

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Twilio-Signature"


def public_url(settings: GatewaySettings, url: URL) -> str:
    """The URL as Twilio sees it: PUBLIC_URL + path (+ query), or the URL as received."""
    if not settings.public_url:
        return str(url)
    full = settings.public_url.rstrip("/") + url.path
    return f"{full}?{url.query}" if url.query else full


def websocket_url(http_url: str) -> str:
    """https://... -> wss://..., http://... -> ws://..."""
    if http_url.startswith("https://"):
        return "wss://" + http_url[len("https://") :]
    if http_url.startswith("http://"):
        return "ws://" + http_url[len("http://") :]
    return http_url


def http_url(ws_url: str) -> str:
    """wss://... -> https://..., ws://... -> http://..."""
    if ws_url.startswith("wss://"):
        return "https://" + ws_url[len("wss://") :]
    if ws_url.startswith("ws://"):
        return "http://" + ws_url[len("ws://") :]
    return ws_url


class TwilioSignatures:
    """Checks X-Twilio-Signature when TWILIO_AUTH_TOKEN is set; accepts everything otherwise."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._validator = RequestValidator(settings.twilio_auth_token) if settings.twilio_auth_token else None

    @property
    def enabled(self) -> bool:
        return self._validator is not None

    def check_webhook(self, request: Request, params: Mapping[str, Any]) -> bool:
        """A POSTed webhook: the public URL and its form parameters."""
        return self._check(request.headers, [public_url(self._settings, request.url)], params, request)

    def check_stream(self, websocket: WebSocket) -> bool:
        """The media stream's WebSocket upgrade: the wss:// URL, no parameters."""
        url = websocket_url(public_url(self._settings, websocket.url.replace(scheme=_http_scheme(websocket.url))))
        return self._check(websocket.headers, [url, http_url(url)], {}, websocket)

    def _check(self, headers: Mapping[str, str], urls: list[str], params: Mapping[str, Any], conn: Any) -> bool:
        if self._validator is None:
            return True
        signature = headers.get(SIGNATURE_HEADER)
        if not signature:
            logger.warning("twilio request to %s without %s: rejected", conn.url.path, SIGNATURE_HEADER)
            return False
        algorithm = get_signature_algorithm(headers.get(SIGNATURE_SETTINGS_HEADER))
        if any(self._validator.validate(url, params, signature, algorithm=algorithm) for url in urls):
            return True
        logger.warning(
            "twilio request to %s with a bad signature (checked against %s; is PUBLIC_URL right?): rejected",
            conn.url.path,
            urls[0],
        )
        return False


class StreamTokens:
    """Per-call tokens for the media stream: HMAC-SHA256 of the call id under a gateway secret.

    The secret is STREAM_TOKEN_SECRET, else derived from TWILIO_AUTH_TOKEN (every gateway of a
    deployment shares it, so a stream may land on any of them), else random for this process
    (development: streams only work on the gateway that answered the webhook).
    """

    TOKEN_CHARS = 43  # 256 bits, URL-safe base64 without padding

    def __init__(self, settings: GatewaySettings) -> None:
        if settings.stream_token_secret:
            key = settings.stream_token_secret.encode()
        elif settings.twilio_auth_token:
            key = hmac.new(settings.twilio_auth_token.encode(), b"callcenter stream token v1", hashlib.sha256).digest()
        else:
            key = secrets.token_bytes(32)
            logger.warning("neither STREAM_TOKEN_SECRET nor TWILIO_AUTH_TOKEN is set: stream tokens are per process")
        self._key = key

    def issue(self, call_id: str) -> str:
        digest = hmac.new(self._key, call_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def check(self, call_id: str, token: str | None) -> bool:
        if not token or len(token) != self.TOKEN_CHARS:
            return False
        return hmac.compare_digest(self.issue(call_id).encode(), token.encode())


def _http_scheme(url: URL) -> str:
    return "https" if url.scheme in ("wss", "https") else "http"


def require_admin(request: Request) -> None:
    """Dependency: `Authorization: Bearer $ADMIN_TOKEN`; 503 when no ADMIN_TOKEN is configured."""
    token = request.app.state.gateway.settings.admin_token
    if not token:
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="admin API disabled: set ADMIN_TOKEN to enable /api/calls",
        )
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
