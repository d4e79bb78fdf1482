"""Stage-1 recipes and stage-2 calibrators."""
