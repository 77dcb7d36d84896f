"""Measuring models: `sample`, `score`, `labels`, `chat`, and the prompt/claim files they read."""
