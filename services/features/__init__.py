"""The features service: the exported feature model on ONNX Runtime, with a cache."""
