"""Server settings every benchmark gives the servers it starts."""

from __future__ import annotations

from townhall.core.limits import CLASSES

# The generators offer thousands of calls/s from 127.0.0.1 (a host repeats its room changes): rate limits stay
# on, so their cost is in every figure, but never refuse. A deployment sets its own (docs/hostile-input.md).
# The benchmarks look for the most listeners a relay serves, and one host makes all the rooms: no cap
# on either.
LIMITS = {
    "TOWNHALL_LIMITS_EXEMPT": "127.0.0.0/8,::1/128",
    **{f"TOWNHALL_LIMITS_{cls.upper()}_USER": "1000000" for cls in CLASSES},
    "TOWNHALL_RELAY_LISTENER_CAPACITY": "1000000",
    "TOWNHALL_ADMISSION_ROOMS_PER_HOST_PER_HOUR": "0",
}
