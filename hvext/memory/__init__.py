"""hvext.memory."""
