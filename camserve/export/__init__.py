"""ONNX export and the onnxruntime explainer, with their commands."""
