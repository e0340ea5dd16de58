"""Triton kernels for llava-next: fused spatial pooling and flash attention, each beside its PyTorch reference.

Imports nothing from the model; the model's attention facade and pooling module plug these in on CUDA.
"""
