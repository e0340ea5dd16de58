"""The other models a page may load besides the one it started with: the same checkpoint with a LoRA adapter,
and the float model a gradient can pass (gradient relevancy maps). Each is loaded on first use and kept.

    source = ModelSource("tiny-random", dtype=torch.float32)
    pipe = source.with_adapter("runs/ko/adapter")   # Pipeline.from_pretrained(..., adapter=DIR): `run --adapter`
    model = source.for_gradients()                    # as `trace --attribute` loads it: float, not prepacked

A bad adapter folder raises the loader's own error (``AdapterError``, what ``llava-next run --adapter DIR``
prints) before anything is loaded. Each loaded model is a full copy in memory (the page's model stays loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime.pipeline import Pipeline


@dataclass
class ModelSource:
    """Where the page's model came from, to load it again another way."""

    model_id: str
    dtype: torch.dtype | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    _adapter: tuple[str, Pipeline] | None = field(default=None, repr=False)  # the last adapter loaded
    _gradients: Pipeline | None = field(default=None, repr=False)

    def with_adapter(self, directory: str) -> Pipeline:
        """The checkpoint with ``directory``'s adapter merged in (float) or beside (quantized), as ``run
        --adapter DIR``; one adapter is kept loaded at a time."""
        if self._adapter is None or self._adapter[0] != directory:
            self._adapter = None  # the previous one's memory first
            pipe = Pipeline.from_pretrained(self.model_id, dtype=self.dtype, device=self.device,
                                            cache_dir=self.cache_dir, progress=False, adapter=directory)
            self._adapter = (directory, pipe)
        return self._adapter[1]

    def for_gradients(self) -> Pipeline:
        """The model as ``trace --attribute`` and training load it (cli/trace_attribute.py ``load``): float, not
        prepacked for oneDNN, so that a gradient passes every linear."""
        if self._gradients is None:
            from ..runtime.loading import load
            from ..train.sft import materialize_trainable

            self._gradients = load(self.model_id, dtype=self.dtype, device=self.device, cache_dir=self.cache_dir,
                                   progress=False, materialize=materialize_trainable)
        return self._gradients
