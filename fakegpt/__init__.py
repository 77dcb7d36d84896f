"""fakegpt: a research harness for studying misinformation uptake in fine-tuned GPT-2 models."""

__version__ = "0.1.0"
