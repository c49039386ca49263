"""Methods drive the trainer: when to evaluate, which tasks stay active, which state is kept."""
