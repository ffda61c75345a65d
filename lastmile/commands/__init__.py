"""Command groups of the `lastmile` CLI, one module each."""
