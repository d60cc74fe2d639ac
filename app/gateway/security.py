"""Request authentication: Twilio's X-Twilio-Signature and the admin bearer token.

Twilio signs the URL it requested (the public one, so `PUBLIC_URL` must be set behind a proxy or
tunnel) plus the sorted POST parameters. For the media stream it signs the WebSocket upgrade: the
`wss://` URL from the TwiML `<Stream url>` with no parameters (the `https://` spelling of the same
URL is accepted too).
"""

from __future__ import annotations

import hmac
import logging
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
