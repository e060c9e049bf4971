"""hvext.daemon."""
