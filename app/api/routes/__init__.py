"""One thin router per resource; the logic they call lives in ``app.services``."""
