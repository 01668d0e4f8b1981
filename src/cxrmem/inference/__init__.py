"""Inference on new images: predict (with Grad-CAM heatmaps), export (ONNX, TorchScript), explain."""
