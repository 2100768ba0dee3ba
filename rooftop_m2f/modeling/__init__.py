from .meta_arch import RooftopMaskFormer  # noqa: F401  registers the meta-architecture
from .transformer_decoder import RooftopMaskedTransformerDecoder  # noqa: F401  registers it
