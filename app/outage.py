"""OutageLog: say that something keeps failing once per interval, and once that it is back.

While Redis (or anything else a loop depends on) is unreachable, a loop that retries every second
or every frame must not log every try. An `OutageLog` logs the first failure at once, then at most
once per `every_s` with how long it has lasted and the last error, and one line when it works again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

LOG_EVERY_S = 30.0


class OutageLog:
    """The outage state of one thing (`subject`) and its rate-limited log lines."""

    def __init__(
        self,
        logger: logging.Logger,
        subject: str,
        *,
        failing: str = "redis unreachable",
        every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.subject = subject
        self._failing = failing
        self.every_s = every_s
        self._clock = clock
        self._since: float | None = None  # when the outage began
        self._logged_at: float | None = None

    @property
    def failing(self) -> bool:
        """The last try failed (and none has worked since)."""
        return self._since is not None

    def failed(self, exc: BaseException, detail: str = "") -> None:
        now = self._clock()
        if self._since is None:
            self._since = now
        if self._logged_at is None or now - self._logged_at >= self.every_s:
            self._logged_at = now
            self._logger.warning(
                "%s: %s for %.0f s (%r)%s; retrying, said once per %.0f s",
                self.subject, self._failing, now - self._since, exc, detail, self.every_s,
            )

    def recovered(self, detail: str = "") -> None:
        if self._since is None:
            return
        self._logger.info("%s: back after %.0f s%s", self.subject, self._clock() - self._since, detail)
        self._since = self._logged_at = None
