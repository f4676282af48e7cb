"""Start the real ``tritonserver`` on an exported model repository (outside Triton; not the engine)."""
