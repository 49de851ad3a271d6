"""Tensor files below both ``merge`` and ``state``: residual entries, durable writes, safetensors
I/O and Hugging Face checkpoints. Nothing here imports ``policy_server.merge`` or
``policy_server.state`` (tests/test_layering.py checks it), so both can build on it."""
