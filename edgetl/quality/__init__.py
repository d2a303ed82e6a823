"""Quality: metrics, plots and the model card."""
