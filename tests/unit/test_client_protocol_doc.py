"""docs/client-protocol.md tells app developers what to do about every error reason the servers send."""

from __future__ import annotations

import re
from pathlib import Path

from townhall.core.errors import Reason

DOC = Path(__file__).resolve().parents[2] / "docs" / "client-protocol.md"


def test_every_reason_has_a_row_and_every_row_is_a_reason() -> None:
    text = DOC.read_text()
    table = text[text.index("## 7. Errors") :]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([A-Z_]+)`", row.split("|")[1])}
    assert named == {reason.value for reason in Reason}
