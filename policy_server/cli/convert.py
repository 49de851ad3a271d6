"""``carve convert``: make a published OpenVLA-OFT checkpoint pickle-free (its ``*.pt`` heads ->
safetensors), so admission and serving never unpickle. The work lives with the backend."""

from policy_server.models.openvla.convert import register  # noqa: F401
