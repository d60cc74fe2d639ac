"""Operations endpoints: liveness, readiness (Redis and a live worker) and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from app.gateway.metrics import CONTENT_TYPE
from app.gateway.state import gateway_state
from app.outage import OutageLog

logger = logging.getLogger(__name__)



async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


class Readiness:
    """GET /readyz: Redis answers and at least one worker is routable (alive, not draining, not
    suspect). While Redis is down (a probe polls every second or so) that is logged once per
    30 s (`app/outage.py`)."""

    def __init__(self) -> None:
        self._outage = OutageLog(logger, "readyz")

    async def readyz(self, request: Request) -> JSONResponse:
        store = gateway_state(request).store
        try:
            await store.redis.ping()
            workers = await store.workers()
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            return JSONResponse(
                {"ready": False, "redis": False, "reason": f"redis unreachable: {exc}"}, status_code=503
            )
        self._outage.recovered()
        routable = [w for w in workers if w.routable]
        free = sum(max(w.max_slots - w.reserved, 0) for w in routable)
        body = {
            "ready": bool(routable),
            "redis": True,
            "live_workers": sum(w.alive for w in workers),
            "routable_workers": len(routable),
            "draining_workers": sum(w.alive and w.draining for w in workers),
            "free_slots": free,
        }
        if not routable:
            body["reason"] = "no routable worker" if any(w.alive for w in workers) else "no live worker"
        return JSONResponse(body, status_code=200 if routable else 503)


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(content=gateway_state(request).metrics.render(), media_type=CONTENT_TYPE)


def build_router() -> APIRouter:
    """GET /healthz, /readyz and /metrics."""
    router = APIRouter(tags=["ops"])
    router.add_api_route("/healthz", healthz, methods=["GET"])
    router.add_api_route("/readyz", Readiness().readyz, methods=["GET"])
    router.add_api_route("/metrics", metrics, methods=["GET"])
    return router
