"""Training: train-head (a typed request, one module per regime, auto), heads, the training loop, sweep, lint, the model card."""
