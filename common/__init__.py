"""What every part of the project shares: the run directory's layout and record, file writes,
user errors and logging. Nothing here imports torch, Ray or Polars."""
