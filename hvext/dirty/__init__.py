"""hvext.dirty."""
