"""Paper tables as YAML grids, the sweep launchers that run them, and the reporter that prints them."""
