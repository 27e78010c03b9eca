"""driftloop.streams."""
