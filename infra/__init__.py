"""driftloop.infra."""
