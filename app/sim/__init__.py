"""A simulated phone call against the gateway, exactly as Twilio places one (`callcenter call`)."""

from app.sim.call import CallOptions, DtmfPlan, RawMessage, run_call
from app.sim.report import CallReport

__all__ = ["CallOptions", "CallReport", "DtmfPlan", "RawMessage", "run_call"]
