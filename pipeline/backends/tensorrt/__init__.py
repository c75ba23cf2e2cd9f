"""TensorRT backend: engines built where TensorRT and an NVIDIA GPU are (an engine is tied to both)."""
