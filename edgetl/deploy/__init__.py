"""What ships to a device: model loading, prediction, the live loop. Imports no torch (a test asserts it)."""
