"""The one training loop (reference loss, schedules, early stopping, checkpoints) and feature normalisation."""
