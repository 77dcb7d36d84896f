"""Loading causal language models (GPT-2, Llama, ...), the model specs the measuring stages accept, device, dtype."""
