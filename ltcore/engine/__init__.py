"""Ray Train side of ltcore: worker loops, checkpoint <-> state dict, rank helpers, trainer builders."""
