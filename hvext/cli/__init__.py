"""hvext.cli."""
