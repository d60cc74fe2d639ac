"""What Twilio sends and expects: webhook parameters, signatures, TwiML, Media Streams messages.

Message shapes follow Twilio's Media Streams reference (connected, start, media, dtmf, mark,
stop; the server may send media, mark and clear). Numbers travel as strings except inside
`mediaFormat`, exactly as Twilio sends them.
"""

from __future__ import annotations

import base64
import json
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator

SIGNATURE_HEADER = "X-Twilio-Signature"
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


def new_sid(prefix: str) -> str:
    """A Twilio-style SID: two letters and 32 hex digits (CA call, AC account, MZ stream)."""
    return prefix + secrets.token_hex(16)


def sign(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """X-Twilio-Signature for a request to `url` with POST `params` (none for a WS upgrade)."""
    return RequestValidator(auth_token).compute_signature(url, params or {})


def voice_webhook_params(
    *, call_sid: str, account_sid: str, from_number: str, to_number: str
) -> dict[str, str]:
    """The form parameters of Twilio's voice webhook for a new inbound call."""
    return {
        "AccountSid": account_sid,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": to_number,
        "Caller": from_number,
        "Direction": "inbound",
        "From": from_number,
        "To": to_number,
    }


def status_callback_params(
    *, call_sid: str, account_sid: str, from_number: str, to_number: str, duration_s: float
) -> dict[str, str]:
    """The form parameters of Twilio's status callback when the call has completed."""
    return {
        **voice_webhook_params(
            call_sid=call_sid, account_sid=account_sid, from_number=from_number, to_number=to_number
        ),
        "CallStatus": "completed",
        "CallDuration": str(max(int(round(duration_s)), 0)),
        "Duration": str(max(int(-(-duration_s // 60)), 1)),
    }


@dataclass(frozen=True)
class TwiML:
    """What a TwiML answer asks for: a media stream, or something else (busy, hang up)."""

    stream_url: str | None
    parameters: dict[str, str] = field(default_factory=dict)
    verbs: tuple[str, ...] = ()
    text: str = ""

    @property
    def connects_stream(self) -> bool:
        return self.stream_url is not None


def parse_twiml(text: str) -> TwiML:
    """Parse a TwiML `<Response>`; finds `<Connect><Stream url>` and its `<Parameter>`s."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"TwiML is not valid XML: {exc}") from exc
    if root.tag != "Response":
        raise ValueError(f"TwiML root is <{root.tag}>, expected <Response>")
    verbs = tuple(child.tag for child in root)
    stream = root.find("./Connect/Stream")
    if stream is None:
        return TwiML(stream_url=None, verbs=verbs, text=text)
    url = stream.get("url")
    if not url:
        raise ValueError("TwiML <Stream> has no url attribute")
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("./Parameter")}
    return TwiML(stream_url=url, parameters=params, verbs=verbs, text=text)


def rebase_url(url: str, public_base: str, actual_base: str) -> str:
    """`url` moved from the public origin to the one we really connect to (ws/wss kept aligned)."""
    public, actual, target = urlsplit(public_base), urlsplit(actual_base), urlsplit(url)
    if target.netloc != public.netloc or public.netloc == actual.netloc:
        return url
    secure = actual.scheme in ("https", "wss")
    scheme = ("wss" if secure else "ws") if target.scheme in ("ws", "wss") else actual.scheme
    return urlunsplit((scheme, actual.netloc, target.path, target.query, target.fragment))


@dataclass
class StreamMessages:
    """Builds the JSON text messages of one Media Stream, numbering them as Twilio does."""

    stream_sid: str
    call_sid: str
    account_sid: str
    sequence: int = 0

    def _next(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    @staticmethod
    def connected() -> str:
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self, custom_parameters: dict[str, str]) -> str:
        return json.dumps(
            {
                "event": "start",
                "sequenceNumber": self._next(),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": dict(MEDIA_FORMAT),
                    "customParameters": dict(custom_parameters),
                },
                "streamSid": self.stream_sid,
            }
        )

    def media(self, ulaw: bytes, chunk: int, timestamp_ms: int) -> str:
        """One caller audio chunk (160 μ-law bytes = 20 ms); `chunk` counts from 1."""
        return json.dumps(
            {
                "event": "media",
                "sequenceNumber": self._next(),
                "media": {
                    "track": "inbound",
                    "chunk": str(chunk),
                    "timestamp": str(timestamp_ms),
                    "payload": base64.b64encode(ulaw).decode("ascii"),
                },
                "streamSid": self.stream_sid,
            }
        )

    def dtmf(self, digit: str) -> str:
        return json.dumps(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    def mark(self, name: str) -> str:
        """Twilio's answer to a mark the server sent: the audio before it has been played."""
        return json.dumps(
            {
                "event": "mark",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    def stop(self) -> str:
        return json.dumps(
            {
                "event": "stop",
                "sequenceNumber": self._next(),
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                "streamSid": self.stream_sid,
            }
        )
