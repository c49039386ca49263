"""The step loop and what it delegates to: evaluation, roll-back state, checkpoints, look-ahead,
timing, progress, the optimizer, and generation for exact match."""
