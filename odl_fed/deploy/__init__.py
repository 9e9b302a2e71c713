"""Real processes: the board and server entries, processes by PID, compose files, certificates."""
