"""driftloop.retrain."""
