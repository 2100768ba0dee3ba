from .. import compat as _compat

_compat.apply()  # before detectron2 / Mask2Former modules are imported
from .meta_arch import RooftopMaskFormer  # noqa: F401  registers the meta-architecture
from .pixel_decoder import RooftopMSDeformAttnPixelDecoder  # noqa: F401  registers it
from .transformer_decoder import RooftopMaskedTransformerDecoder  # noqa: F401  registers it
