"""hvext.pmem."""
