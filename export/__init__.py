"""Export trained checkpoints to ONNX, OpenVINO IR (FP16/INT8) and TensorRT-ready ONNX; benchmarks."""
