"""hvext.ha."""
