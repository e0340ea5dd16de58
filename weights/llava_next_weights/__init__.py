"""Checkpoint key tables, conversion into llava-next's safetensors layout, lazy (mmap) loading and hub access."""
