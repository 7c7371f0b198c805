"""Example payloads shared by the tests, from Microsoft's documentation (docs/mde-api.md §1, §6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Microsoft's documented batchUpdate example, as shipped for the README's curl example.
MICROSOFT_EXAMPLE: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "docs" / "example-batch-update.json").read_text(
        encoding="utf-8"
    )
)
ID1, ID2 = MICROSOFT_EXAMPLE["alertIds"]
