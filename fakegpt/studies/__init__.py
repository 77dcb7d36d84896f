"""Stages that chain others: `main` (`fakegpt pipeline`), `mixture` (dose series), `tune`, `validate`."""
