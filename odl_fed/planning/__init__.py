"""What fits a device: the rank planner, the device planner, the preflight of a fleet."""
