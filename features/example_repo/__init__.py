"""driftloop.features.example_repo."""
