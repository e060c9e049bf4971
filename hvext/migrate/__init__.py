"""Live migration through libvirt, with a policy chosen from dirty rate and bandwidth (C10)."""
