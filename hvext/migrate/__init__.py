"""hvext.migrate."""
