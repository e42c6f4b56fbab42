"""Server settings every benchmark gives the servers it starts."""

from __future__ import annotations

from townhall.core.limits import CLASSES

# The generators offer thousands of calls/s from 127.0.0.1 (a host repeats its room changes): rate limits stay
# on, so their cost is in every figure, but never refuse. A deployment sets its own (docs/hostile-input.md).
LIMITS = {
    "TOWNHALL_LIMITS_EXEMPT": "127.0.0.0/8,::1/128",
    **{f"TOWNHALL_LIMITS_{cls.upper()}_USER": "1000000" for cls in CLASSES},
}
