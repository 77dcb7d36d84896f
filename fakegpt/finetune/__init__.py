"""The `finetune` stage: training loop, its checks, batches, distributed setup, checkpoints."""
