"""Print a demo booking that starts in 90 seconds (for `reminders book -`).

    .venv/bin/python examples/demo_booking.py | .venv/bin/reminders book -

Usage: demo_booking.py [BOOKING_ID] [SECONDS_FROM_NOW]
"""

import json
import sys
from datetime import UTC, datetime, timedelta

booking_id = sys.argv[1] if len(sys.argv) > 1 else "DEMO-1"
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 90.0
starts_at = datetime.now(UTC) + timedelta(seconds=seconds)
print(json.dumps({
    "clinic": "demo",
    "booking_id": booking_id,
    "treatment": "demo",
    "starts_at": starts_at.isoformat(timespec="seconds"),
    "patient": {
        "name": "Ana López",
        "email": "ana@example.com",
        "phone": "+34600111222",
        "timezone": "Europe/Madrid",
        "locale": "en",
        "channels": ["sms", "email"],
    },
    "medications": {"tretinoin": True, "retinol": False, "isotretinoin_last_dose": None},
}))
