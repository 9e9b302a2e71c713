"""What a user writes: fleets, jobs, device profiles, run and node config (plain Python and YAML, no torch)."""
