"""Loading GPT-2 models, the model references the measuring stages accept, device and dtype."""
