"""The gateway: Twilio webhooks and media streams, the admin API, health and metrics (see app.py)."""
