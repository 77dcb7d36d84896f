"""Telegram exports -> cleaned messages -> GPT-2 token bins (the `prepare` stage and its readers)."""
