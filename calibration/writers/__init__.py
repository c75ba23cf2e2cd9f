"""Writers: the same calibration, in each backend's format.

* :mod:`calibration.writers.qdq`: QDQ ONNX for ONNX Runtime, and the TensorRT-compatible QDQ
  (symmetric int8, zero point 0, per-channel weights on the output axis).
* :mod:`calibration.writers.tensorrt`: TensorRT calibration cache (implicit INT8).
* :mod:`calibration.writers.ncnn`: ncnn2table-format INT8 table.
* :mod:`calibration.writers.tflite`: calibration samples (.npy + manifest) for litert-torch.
"""
