"""Fine-tuning: the training data (data.py); the trainer, LoRA and QLoRA follow (issue 29)."""

from .data import (IGNORE_INDEX, Batch, DataError, Example, Record, Summary, TrainingData, collate,
                   encode_conversation, frame_indices, pad_id, read_records, render_conversation, validate)

__all__ = ["IGNORE_INDEX", "Batch", "DataError", "Example", "Record", "Summary", "TrainingData", "collate",
           "encode_conversation", "frame_indices", "pad_id", "read_records", "render_conversation", "validate"]
