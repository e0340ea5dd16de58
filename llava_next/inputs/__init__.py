"""What goes into the model: images (AnyRes pixels), videos (PyAV decoding, frame sampling), prompts
(chat templates, tokenizer) and the token plan (counts, RoPE context check). Imports config and the
model's geometry (anyres, pooling sizes)."""
