"""When a Hub answer is worth asking again, and how long it asks us to wait.

One list of transient statuses and one reading of Retry-After, for range reads (scanner.fetch) and
API calls (scanner.hub). A Retry-After longer than MAX_RETRY_AFTER is not waited out at any level:
a worker blocked for hours (a 429 asking for 99,999 s) is worse than a model failed in one line,
which the next crawl takes up again.
"""

import email.utils
import math
from datetime import UTC, datetime

TRANSIENT_STATUS = (429, 500, 502, 503, 504)
MAX_RETRY_AFTER = 600.0  # seconds: a Retry-After asking for longer fails the call instead of blocking a worker


def retry_after(response) -> float | None:
    """The seconds a response's Retry-After header asks for (a number or an HTTP date), or None."""
    headers = getattr(response, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
