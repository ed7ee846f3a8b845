"""Fine-tuning: data, the training loop, checkpoints."""
