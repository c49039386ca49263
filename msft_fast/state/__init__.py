"""What outlives a step: snapshots for roll-backs and their copy engine, checkpoints, history.json,
trackers, the exported model, and atomic writes."""
