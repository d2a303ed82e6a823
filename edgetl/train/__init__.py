"""Training: heads on cached embeddings, fewer frozen layers, full fine-tuning, and the train-head orchestration."""
