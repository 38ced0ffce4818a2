"""The device's side of staged rollouts: the fleet agent and what it stands on."""
