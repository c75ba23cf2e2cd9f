"""edgeship: PyTorch -> ONNX -> edge artifacts, calibrated INT8, deployed and measured on devices.

Importing this package is cheap on purpose: no torch, onnxruntime or other heavy stack is
imported until a stage that needs it runs.
"""

__version__ = "0.1.0"
