"""Stages that chain others: `pipeline` (MLproject main), `mixture` (dose series), `tune`, `validate`."""
