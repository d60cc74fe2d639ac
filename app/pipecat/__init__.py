"""Pipecat building blocks: `PersonaPlexService` (app.pipecat.service) and the resampler (app.pipecat.audio)."""
