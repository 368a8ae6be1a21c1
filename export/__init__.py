"""Builds the feature models: trained weights into PyTorch, then ONNX, with a manifest."""
