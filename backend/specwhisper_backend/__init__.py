"""What runs inside Triton's Python backend: the speculative Whisper engine (NumPy + ONNX Runtime) and its glue."""
