"""The model itself: vision towers, AnyRes packing, pooling, projector, decoder, attention backends,
the whole LLaVA-NeXT model (encode -> splice -> decode) and token generation. Imports only config and
llava_next_weights (key names); never the input pipeline or the command line."""
