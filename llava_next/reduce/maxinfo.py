"""MaxInfo: choose the frames whose embeddings span the most volume (rectangular max-volume rows).

Sources: paper arXiv:2502.03183 (MaxInfo, FusionBrainLab); the released selection code was not
available here: a file matching its description (OpenAI CLIP ViT-B/32 ``encode_image`` -> sklearn
``TruncatedSVD(n_components=8, random_state=42)`` -> ``maxvolpy.maxvol.rect_maxvol(Qs, maxK=64, tol=0.3)``,
sorted) was read instead (a "MaxInfo-like file", not verified as official; docs/reduction.md).
``rect_maxvol`` reproduces maxvolpy's ``py_rect_maxvol`` / ``py_maxvol`` (maxvolpy/maxvol.py, A. Mikhalev,
MIT) step for step, in float64 torch instead of scipy's LAPACK/BLAS calls.

    candidates = ~candidate_fps frames per second (uniform, at most max_candidates, at least --frames)
    E = embed(candidates)                    (n, C): the model's own CLIP tower (see below)
    A = U_R Sigma_R (rank R = rank)          exact SVD, uncentered, float64
    rows = rect_maxvol(A, tol, maxK=frames)  R <= len(rows) <= frames
    -> sorted(rows)

Differences from the paper / that code, as options or notes:
- ``embedding="cls"``: the CLS token of the model's own vision tower at its feature layer (CLIP
  ViT-L/14-336 layer -2, 1024-d, no projection head); the code uses a separate CLIP ViT-B/32's projected
  CLS (512-d). ``"patch_mean"``: the mean of the patch features instead. A SigLIP tower (Interleave,
  OneVision, LLaVA-Video) has no CLS token, so ``cls`` is a clear error there: the paper and the code
  followed embed with CLIP's (projected) CLS and say nothing about other encoders; SigLIP's own pooled
  output comes from its attention-pooling head, which LLaVA never runs and the loader does not keep.
  ``patch_mean`` works on both.
- Exact SVD (``torch.linalg.svd``) instead of sklearn's randomized TruncatedSVD; rect_maxvol's choice
  depends only on the column space of A (C = A A_I^-1 is unchanged by A -> A M for invertible M), which
  the randomized solver approximates. U_R (paper) vs U_R Sigma_R (code) select the same rows, for the same reason.
- A rank-deficient embedding (a static video) keeps only the numerically nonzero singular directions
  (singular value > 1e-6 x the largest), so the LU pivots stay finite.
- The rank is capped at the frame budget (maxvolpy raises ``maxK`` to the rank, returning more frames
  than asked for).
- Candidates: the code samples 1 fps; here ``candidate_fps`` frames per second, uniformly over the video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..model import policy
from .stages import FrameSelector, ReductionError


def maxvol(A: torch.Tensor, tol: float = 1.05, max_iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Square maxvol (maxvolpy ``py_maxvol``): r rows of the (N, r) matrix A whose submatrix has (locally)
    maximal volume: every entry of C = A A_I^-1 is at most ``tol`` in size. Returns (rows (r,), C (N, r))."""
    tol = max(tol, 1.0)
    N, r = A.shape
    if N <= r:
        return torch.arange(N), torch.eye(N, dtype=A.dtype)
    _, piv = torch.linalg.lu_factor(A)  # getrf with partial pivoting; LAPACK pivots are 1-based
    index = torch.arange(N)
    for i, p in enumerate((piv - 1).tolist()[:r]):  # the row swaps, applied to the identity order
        index[i], index[p] = index[p].clone(), index[i].clone()
    Ct = torch.linalg.solve(A[index[:r]].T, A.T)  # (r, N): C^T, C = A A_I^-1
    i, j = divmod(int(Ct.abs().argmax()), N)
    iters = 0
    while abs(float(Ct[i, j])) > tol and iters < max_iters:  # swap row index[i] out for row j
        index[i] = j
        row, col = Ct[i].clone(), Ct[:, j].clone()
        col[i] -= 1.0
        Ct -= (1.0 / Ct[i, j]) * torch.outer(col, row)
        iters += 1
        i, j = divmod(int(Ct.abs().argmax()), N)
    return index[:r].clone(), Ct.T


def rect_maxvol(A: torch.Tensor, tol: float = 1.0, max_k: int | None = None, min_k: int | None = None,
                start_maxvol_iters: int = 10) -> torch.Tensor:
    """Rectangular 2-volume maximisation (maxvolpy ``py_rect_maxvol``): start from ``maxvol``'s r rows and
    greedily add the row with the largest ||C_i||^2 while it exceeds tol^2 and fewer than ``max_k`` rows
    are chosen (or fewer than ``min_k``), updating C by the rank-1 formula. Returns the rows in the order
    chosen (between r and max_k of them)."""
    A = A.to(torch.float64)
    N, r = A.shape
    if N <= r:
        return torch.arange(N)
    max_k = N if max_k is None or max_k > N else max(max_k, r)
    min_k = r if min_k is None or min_k < r else min(min_k, N)
    min_k = min(min_k, max_k)
    index = torch.zeros(N, dtype=torch.long)
    chosen = torch.ones(N, dtype=torch.float64)
    first, C = maxvol(A, 1.05, start_maxvol_iters)
    index[:r] = first
    chosen[first] = 0
    C = C.clone()
    row_norm_sqr = chosen * (C * C).sum(1)
    i = int(row_norm_sqr.argmax())
    K = r
    while (float(row_norm_sqr[i]) > tol * tol and K < max_k) or K < min_k:
        index[K] = i
        chosen[i] = 0
        c = C[i].clone()
        v = C @ c
        l = 1.0 / (1.0 + float(v[i]))
        C = torch.cat([C - l * torch.outer(v, c), (l * v)[:, None]], dim=1)
        row_norm_sqr = (row_norm_sqr - l * v * v) * chosen
        i = int(row_norm_sqr.argmax())
        K += 1
    return index[:K].clone()


@dataclass(frozen=True)
class MaxInfo(FrameSelector):
    """Defaults from the code: rank 8, tol 0.3 (max_n 64 there; here ``frames``, 0 = the request's --frames)."""

    frames: int = 0  # at most this many frames (maxK); 0: the number of frames the request asks for
    rank: int = 8
    tol: float = 0.3
    candidate_fps: float = 1.0
    max_candidates: int = 128
    embedding: Literal["cls", "patch_mean"] = "cls"

    name: ClassVar[str] = "maxinfo"

    def __post_init__(self) -> None:
        if not isinstance(self.frames, int) or self.frames < 0:
            raise ReductionError(f"maxinfo: frames must be an integer >= 0 (0 = --frames), got {self.frames!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ReductionError(f"maxinfo: rank must be an integer >= 1, got {self.rank!r}")
        if not self.tol > 0 or not self.candidate_fps > 0 or self.max_candidates < 1:
            raise ReductionError("maxinfo: tol and candidate_fps must be > 0 and max_candidates >= 1, got "
                                 f"{self.tol!r}, {self.candidate_fps!r}, {self.max_candidates!r}")
        if self.embedding not in ("cls", "patch_mean"):
            raise ReductionError(f"maxinfo: embedding must be 'cls' or 'patch_mean', got {self.embedding!r}")

    def budget(self, requested: int) -> int:
        return self.frames or requested

    def candidate_count(self, requested: int, total_frames: int, fps: float) -> int:
        seconds = total_frames / fps if fps > 0 else total_frames
        n = math.ceil(seconds * self.candidate_fps)
        return max(self.budget(requested), min(n, self.max_candidates))

    @torch.no_grad()
    def embeddings(self, pixel_values: torch.Tensor, model, frame_batch: int = policy.FRAME_BATCH) -> torch.Tensor:
        """(N, C) fp32 embedding of each candidate frame from the model's vision tower."""
        tower = model.vision_tower
        if self.embedding == "patch_mean":  # the tower's own features at its feature layer, averaged
            return torch.cat([tower(c).float().mean(1) for c in pixel_values.to(model.device, model.dtype).split(frame_batch)])
        if not hasattr(tower, "class_embedding"):
            raise ReductionError("maxinfo: embedding=cls needs a tower with a CLS token (CLIP); this model's tower has "
                                 "none (SigLIP), and neither the paper nor the code it follows offers a substitute: "
                                 "use maxinfo:embedding=patch_mean")
        out = []
        for chunk in pixel_values.to(model.device, model.dtype).split(frame_batch):
            x = tower.patch_embedding(chunk).flatten(2).transpose(1, 2)  # (n, g*g, C): VisionTower.forward
            x = torch.cat([tower.class_embedding.expand(x.shape[0], 1, -1), x], 1) + tower.position_embedding.weight
            x = tower.pre_layernorm(x)
            for layer in tower.layers:
                x = layer(x)
            out.append(x[:, 0])
        return torch.cat(out).float()

    def select(self, pixel_values: torch.Tensor, model, frames: int) -> list[int]:
        return select_rows(self.embeddings(pixel_values, model), self.rank, self.tol, self.budget(frames))


def select_rows(embeddings: torch.Tensor, rank: int, tol: float, max_k: int) -> list[int]:
    """Truncated SVD of (n, C) embeddings to ``rank`` columns (U S), then sorted ``rect_maxvol`` rows."""
    n = embeddings.shape[0]
    if n <= max_k and n <= rank:
        return list(range(n))
    U, S, _ = torch.linalg.svd(embeddings.double(), full_matrices=False)
    r = min(rank, max_k, int((S > S[0] * 1e-6).sum()))  # maxvolpy would raise maxK to the rank instead
    A = U[:, :r] * S[:r]
    return sorted(rect_maxvol(A, tol=tol, max_k=max_k).tolist())
