"""hvext.agent."""
