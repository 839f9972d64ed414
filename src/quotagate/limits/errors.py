"""The limiter's one error.

    LimiterUnavailable   the shared limiter (Redis) cannot be reached and the failure policy says the
                         request must not be admitted blind; the LLM API answers 503 in OpenAI's shape
"""

from __future__ import annotations


class LimiterUnavailable(Exception):
    """Limits cannot be checked right now (Redis unreachable); retrying after ``retry_after`` s may work."""

    code = "limiter_unavailable"

    def __init__(self, message: str = "rate limits cannot be checked right now; retry shortly",
                 retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
