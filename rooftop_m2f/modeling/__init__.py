from .meta_arch import RooftopMaskFormer  # noqa: F401  registers the meta-architecture
