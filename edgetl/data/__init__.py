"""Data: scanning folders, the one host-side preprocessing, the decode pipeline, the embedding cache, embedding."""
