"""Server settings every benchmark gives the servers it starts."""

from __future__ import annotations

import dataclasses

from townhall.core.config import LimitsConfig

# The generators offer thousands of calls/s and hold thousands of streams from 127.0.0.1 (a host repeats
# its room changes): rate limits and the bounds on calls in flight stay on, so their cost is in every
# figure, but never refuse. A deployment sets its own (docs/hostile-input.md).
# The benchmarks look for the most listeners a relay serves, and one host makes all the rooms: no cap
# on either.
_NEVER = "1000000"
LIMITS = {
    **{
        f"TOWNHALL_LIMITS_{f.name.upper()}": _NEVER
        for f in dataclasses.fields(LimitsConfig)
        if f.name.endswith(("_user", "_address"))
    },
    "TOWNHALL_SERVER_MAX_CALLS_PER_CONNECTION": _NEVER,
    "TOWNHALL_SERVER_MAX_CALLS_PER_ADDRESS": _NEVER,
    "TOWNHALL_ADMISSION_MAX_CALLS_PER_ADDRESS": _NEVER,
    "TOWNHALL_RELAY_LISTENER_CAPACITY": _NEVER,
    "TOWNHALL_ADMISSION_ROOMS_PER_HOST_PER_HOUR": "0",
}
