"""ONNX Runtime backend: fp32, fp16 (weights and activations, fp32 I/O), INT8 QDQ from edgeship's calibration."""
