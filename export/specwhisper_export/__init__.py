"""Import Whisper checkpoints and export them to the ONNX graphs the Triton backend serves."""
