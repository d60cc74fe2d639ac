"""Admin API: the call records (`Authorization: Bearer $ADMIN_TOKEN`; 503 when ADMIN_TOKEN is unset)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from app.gateway.security import require_admin
from app.gateway.state import gateway_state


async def list_calls(
    request: Request,
    limit: int = Query(default=50, ge=1, le=1000),
    active: bool = Query(default=False, description="only calls not yet ended"),
) -> dict[str, Any]:
    """The newest call records."""
    records = await gateway_state(request).store.list_calls(limit=limit, active_only=active)
    return {"calls": [r.model_dump(mode="json") for r in records]}


async def get_call(request: Request, call_id: str) -> dict[str, Any]:
    """One call: its record, its events (transitions, DTMF, text, ...) and the bot's transcript."""
    store = gateway_state(request).store
    record = await store.get_call(call_id)
    if record is None:
        raise HTTPException(status_code=404, detail=f"no call {call_id!r}")
    return {
        "call": record.model_dump(mode="json"),
        "events": await store.events(call_id),
        "transcript": await store.transcript(call_id),
    }


def build_router() -> APIRouter:
    """GET /api/calls and GET /api/calls/{call_id}, behind the admin token."""
    router = APIRouter(prefix="/api", tags=["admin"], dependencies=[Depends(require_admin)])
    router.add_api_route("/calls", list_calls, methods=["GET"])
    router.add_api_route("/calls/{call_id}", get_call, methods=["GET"])
    return router
