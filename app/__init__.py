"""The application around the workers: the CLI, the supervisor of the embedded stack, producers,
the demo and its report."""
