"""The model itself: vision towers, AnyRes packing, pooling, projector, decoder, attention backends,
the whole LLaVA-NeXT model (encode -> splice -> decode) and token generation. Imports only config and
llava_next_weights (key names); never the input pipeline or the command line."""

from .mkl_vml import resolve_vml_dispatch

resolve_vml_dispatch()  # before any model code runs a float unary op on several threads (mkl_vml.py)
