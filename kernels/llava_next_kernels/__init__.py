"""Triton kernels for llava-next: fused spatial pooling and flash attention, each beside its PyTorch reference.

Imports nothing from the model. On CUDA the model's attention facade uses ``flash_attention`` (same
signature as its ``attention``) and the video pooling step uses ``spatial_pool``. On CPU the kernels run
only under the Triton interpreter (TRITON_INTERPRET=1 set before this package is imported) — for tests.
"""

from .attention import (attention_reference, decode_attention, flash_attention, flash_attention_with_key_mass,
                        key_mass_reference)
from .pooling import pooled_token_count, spatial_pool, spatial_pool_reference

__all__ = ["flash_attention", "flash_attention_with_key_mass", "decode_attention", "attention_reference",
           "key_mass_reference", "spatial_pool", "spatial_pool_reference", "pooled_token_count"]
