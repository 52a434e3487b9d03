"""Stage: the ONNX export and its checks against PyTorch."""
