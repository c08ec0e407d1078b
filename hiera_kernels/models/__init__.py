"""Drop-in Hiera models: the official factories, arguments and checkpoint keys."""

from .hiera import (
    Head,
    Hiera,
    HieraBlock,
    MaskUnitAttention,
    PatchEmbed,
    Reroll,
    Unroll,
    hiera_base_16x224,
    hiera_base_224,
    hiera_base_plus_16x224,
    hiera_base_plus_224,
    hiera_huge_16x224,
    hiera_huge_224,
    hiera_large_16x224,
    hiera_large_224,
    hiera_small_224,
    hiera_tiny_224,
)
from .hiera_mae import (
    MaskedAutoencoderHiera,
    mae_hiera_base_16x224,
    mae_hiera_base_224,
    mae_hiera_base_plus_16x224,
    mae_hiera_base_plus_224,
    mae_hiera_huge_16x224,
    mae_hiera_huge_224,
    mae_hiera_large_16x224,
    mae_hiera_large_224,
    mae_hiera_small_224,
    mae_hiera_tiny_224,
)

CLASSIFIERS = (
    "hiera_tiny_224",
    "hiera_small_224",
    "hiera_base_224",
    "hiera_base_plus_224",
    "hiera_large_224",
    "hiera_huge_224",
    "hiera_base_16x224",
    "hiera_base_plus_16x224",
    "hiera_large_16x224",
    "hiera_huge_16x224",
)
AUTOENCODERS = tuple("mae_" + name for name in CLASSIFIERS)
FACTORIES = CLASSIFIERS + AUTOENCODERS

__all__ = [
    "Head",
    "Hiera",
    "HieraBlock",
    "MaskUnitAttention",
    "MaskedAutoencoderHiera",
    "PatchEmbed",
    "Reroll",
    "Unroll",
    *FACTORIES,
]
