"""The decoder split over N processes with PyTorch's tensor parallelism (DeviceMesh + DTensor); vision replicated.

    torchrun --nproc-per-node 2 --no-python llava-next run --video clip.mp4 "What happens?"

    mesh = init_mesh("cpu")                                    # launch.py: gloo on CPU, NCCL on CUDA
    pipe = load_tensor_parallel("llava-hf/LLaVA-NeXT-Video-7B-hf", mesh, dtype=torch.bfloat16)
    ... then exactly the single-process Pipeline API (prepare / stream / generate_batch) on every rank

The sharding plan is the Megatron one that vLLM and SGLang use for Llama-style decoders (their
``llama.py``: QKVParallelLinear / RowParallelLinear / MergedColumnParallelLinear / VocabParallelEmbedding
/ ParallelLMHead), written as torch's own parallel styles (``torch.distributed.tensor.parallel``):

    | module (under language_model)  | style                                   | weight held per rank   | communication          |
    |---------------------------------|-----------------------------------------|------------------------|------------------------|
    | embed_tokens                    | RowwiseParallel(input_layouts=Replicate)| rows V/N (vocabulary)  | all-reduce of (B,T,C)  |
    | layers.*.self_attn.q/k/v_proj   | ColwiseParallel                         | rows: heads/N, kv/N    | none                   |
    | layers.*.self_attn.o_proj       | RowwiseParallel                         | columns: heads/N       | all-reduce of (B,T,C)  |
    | layers.*.mlp.gate/up_proj       | ColwiseParallel                         | rows I/N               | none                   |
    | layers.*.mlp.down_proj          | RowwiseParallel                         | columns I/N            | all-reduce of (B,T,C)  |
    | lm_head                         | ColwiseParallel(output_layouts=Replicate)| rows V/N              | all-gather of logits   |
    | norms, vision tower, projector, image_newline | replicated (plain tensors) | all                  | frames/tiles gathered  |

Each rank attends with its own query heads and the KV heads they read (heads h*N/H.. of q go with the
matching kv heads: with GQA, q head j uses kv head j // groups, and contiguous splits keep that), and
its KV cache holds only those kv heads (``decoder.setup_caches`` sizes it from the attention module).
So the head counts, the MLP width and the vocabulary must divide by N (``check_tp_size`` says which
N work); KV-head replication for N > kv heads (vLLM does it) is not implemented.

Choices
- Loading: the model is built on the meta device and parallelized there (``src_data_rank=None``: no
  scatter from rank 0), so every parameter is a meta DTensor of the right global and local shape;
  ``llava_next_weights.load.load_into`` then narrows each mmapped checkpoint tensor to this rank's
  slice (rows are a zero-copy view; column slices are copied and the file pages dropped), so each
  rank reads only its slices and holds about 1/N of the decoder (``weights_per_rank`` computes it
  from this plan, docs/parallel.md's memory table uses it).
- Vision: the CLIP tower is small (0.3 B) next to the decoder and a TP tower would all-reduce after
  every layer (SGLang's DP-encoder rationale), so it is replicated, and the frames/tiles of a request
  are split across ranks instead (vLLM's ``mm_encoder_tp_mode="data"``): each rank runs the tower on
  its share and the features are all-gathered, so the encoder's time divides by N.
- Sampling: logits come out replicated (all-gathered), identical on every rank, so every rank samples
  the same token with the same seed; ``shared_seed`` makes one seed for all when none is given.
- The vision tower and projector are prepacked for oneDNN on CPU (``LlavaNextModel.pack_for_cpu``'s
  layers); the decoder's DTensor linears run through DTensor's F.linear.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from ..config import LlavaNextConfig, TextConfig
from ..model.llava import LlavaNextModel, PackedLinear, can_pack_for_cpu
from ..model.int8_activations import Activations
from ..runtime.memory import memory_budget
from ..runtime.pipeline import Pipeline
from .launch import RankFailedError, agree, dist_env, init_mesh, rank0_output, report_own_failure

# module name pattern (under language_model) -> (style, dimension of the weight that is split)
PLAN: dict[str, tuple[str, int]] = {
    "embed_tokens": ("vocab_parallel_embedding", 0),
    "layers.*.self_attn.q_proj": ("colwise", 0),
    "layers.*.self_attn.k_proj": ("colwise", 0),
    "layers.*.self_attn.v_proj": ("colwise", 0),
    "layers.*.self_attn.o_proj": ("rowwise", 1),
    "layers.*.mlp.gate_proj": ("colwise", 0),
    "layers.*.mlp.up_proj": ("colwise", 0),
    "layers.*.mlp.down_proj": ("rowwise", 1),
    "lm_head": ("vocab_parallel_lm_head", 0),
}


class TensorParallelError(ValueError):
    """N does not fit the model (heads, MLP width or vocabulary not divisible); the message says which N work."""


def _styles():
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "vocab_parallel_embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
        "vocab_parallel_lm_head": lambda: ColwiseParallel(output_layouts=Replicate()),
    }


# ---- which N work ---------------------------------------------------------------------------------
def _split_sizes(text: TextConfig) -> dict[str, int]:
    return {"num_heads": text.num_heads, "num_kv_heads (GQA)": text.num_kv_heads,
            "intermediate_size": text.intermediate_size, "vocab_size": text.vocab_size}


def working_tp_sizes(text: TextConfig, up_to: int = 64) -> list[int]:
    """Every N <= ``up_to`` that divides the heads, the kv heads, the MLP width and the vocabulary."""
    return [n for n in range(1, up_to + 1) if all(size % n == 0 for size in _split_sizes(text).values())]


def check_tp_size(text: TextConfig, n: int) -> None:
    bad = [f"{name} {size}" for name, size in _split_sizes(text).items() if size % n]  # e.g. "num_heads 56"
    if bad:
        raise TensorParallelError(
            f"the decoder cannot be split over {n} processes: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
            f"not divisible by {n} (each rank takes an equal share of the heads, the MLP and the vocabulary). Use a "
            f"number of processes that works for this model: {', '.join(map(str, working_tp_sizes(text)))}")


def rank_text_config(text: TextConfig, n: int) -> TextConfig:
    """The sizes one rank's decoder computes with (heads, kv heads and MLP width / n): what the memory
    check of a run (``runtime.memory.memory_budget``) must count per process."""
    check_tp_size(text, n)
    return dataclasses.replace(text, num_heads=text.num_heads // n, num_kv_heads=text.num_kv_heads // n,
                               intermediate_size=text.intermediate_size // n, head_dim=text.head_dim)


def _split_dim(name: str) -> int | None:
    """The dimension PLAN splits the decoder tensor ``name`` (e.g. 'layers.3.mlp.up_proj.weight') on, or None."""
    from fnmatch import fnmatch

    module = name.rsplit(".", 1)[0]
    return next((dim for pattern, (_, dim) in PLAN.items() if fnmatch(module, pattern)), None)


def weights_per_rank(config: LlavaNextConfig, n: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of weights one of ``n`` ranks holds: {"decoder": sharded + replicated norms, "vision":
    tower + projector + newline (replicated)}. From the plan and the shapes of a meta-device model."""
    check_tp_size(config.text, n)
    with torch.device("meta"):
        model = LlavaNextModel(config)
    size = torch.empty((), dtype=dtype).element_size()
    out = {"decoder": 0, "vision": 0}
    for name, p in model.named_parameters():
        if name.startswith("language_model."):
            dim = _split_dim(name.removeprefix("language_model."))
            out["decoder"] += p.numel() * size // (n if dim is not None else 1)
        else:
            out["vision"] += p.numel() * size
    return out


# ---- parallelize and load -------------------------------------------------------------------------
def parallelize(model: LlavaNextModel, mesh) -> LlavaNextModel:
    """Shard ``model.language_model`` over the 1-D ``mesh`` by PLAN (on the meta device: no data moves) and
    split the vision tower's batch across the ranks."""
    from torch.distributed.tensor.parallel import parallelize_module

    n = mesh.size()
    check_tp_size(model.config.text, n)
    styles = _styles()
    plan = {}
    for pattern, (style, _) in PLAN.items():
        plan[pattern] = styles[style]()
        plan[pattern].src_data_rank = None  # shapes only: each rank loads its own slices afterwards
    for layer in model.language_model.layers:  # attention reshapes with these counts: make them local
        layer.self_attn.num_heads //= n
        layer.self_attn.num_kv_heads //= n
    parallelize_module(model.language_model, mesh, plan)
    split_batch_across_ranks(model.vision_tower, mesh.get_group())
    return model


def split_batch_across_ranks(module: nn.Module, group) -> None:
    """Make ``module(x)`` run on this rank's share of x's first dimension and return the all-gathered result.

    Shares are equal (gloo's all_gather wants equal sizes): the batch is padded with copies of its last
    item up to a multiple of N and the padding is dropped after gathering."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes: list[int] = []

    def take_share(mod, args):
        x = args[0]  # (n, ...)
        n = x.shape[0]
        per = -(-n // world)
        if per * world > n:
            x = torch.cat([x, x[-1:].expand(per * world - n, *x.shape[1:])])
        sizes.append(n)
        return (x[rank * per:(rank + 1) * per], *args[1:])

    def gather(mod, args, out):
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous(), group=group)
        return torch.cat(parts)[:sizes.pop()]

    module.register_forward_pre_hook(take_share)
    module.register_forward_hook(gather)


@torch.no_grad()
def pack_replicated_for_cpu(model: LlavaNextModel) -> bool:
    """``LlavaNextModel.pack_for_cpu`` for the replicated parts only (vision tower, projector): the decoder's
    linears hold DTensors, which oneDNN's packed layout cannot hold."""
    if not can_pack_for_cpu(model.dtype, model.device):
        return False
    slots = [(parent, name) for root in (model.vision_tower, model.projector) for parent in root.modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and can_pack_for_cpu(child.weight.dtype, child.weight.device)]
    for parent, name in slots:
        setattr(parent, name, PackedLinear(getattr(parent, name)))
    return True


def load_model(path, mesh, *, config: LlavaNextConfig | None = None, dtype: torch.dtype | None = None,
               device: str = "cpu") -> LlavaNextModel:
    """The model of a converted directory with its decoder split over ``mesh``: built on the meta device,
    parallelized, then each rank's slices mmapped (``load_into``); vision layers prepacked on CPU."""
    from llava_next_weights.load import load_into, read_config

    config = config or read_config(path)
    with torch.device("meta"):
        model = LlavaNextModel(config)
    parallelize(model, mesh)
    load_into(model, path, dtype=dtype, device=device)
    pack_replicated_for_cpu(model)
    return model.eval()


def memory_per_rank(config: LlavaNextConfig, n: int, dtype: torch.dtype, prompt_tokens: int, new_tokens: int,
                    batch: int = 1) -> dict[str, int]:
    """Bytes one of ``n`` ranks needs: its weights (``weights_per_rank``) plus what a run allocates, from
    ``runtime.memory.memory_budget`` (the check every run makes before it starts) with one rank's sizes."""
    weights = weights_per_rank(config, n, dtype)
    budget = memory_budget(rank_text_config(config.text, n), batch, prompt_tokens, new_tokens, dtype,
                           torch.device("cpu"))
    out = {**weights, "kv_cache": budget.kv_cache_bytes, "activations": budget.activation_bytes}
    out["total"] = sum(out.values())
    return out


def load_tensor_parallel(model_id_or_dir, mesh, *, dtype: torch.dtype | None = None, device: str = "cpu",
                         cache_dir=None, progress: bool = True):
    """A ``Pipeline`` whose decoder is split over ``mesh`` (every rank calls this): the runtime's loader
    (runtime/loading.py) with this package's model (``load_model``: parallelized, each rank's slices).
    Resolving (download, conversion) happens on each machine's local rank 0 first, the others then find
    it cached. Errors on any rank become one ``RankFailedError`` on all of them."""
    from ..runtime.loading import load

    env = dist_env()

    def local_rank0_first(resolve):
        first = agree("resolving the checkpoint", resolve if env.local_rank == 0 else lambda: None)
        then = agree("resolving the checkpoint", resolve if env.local_rank != 0 else lambda: None)
        return first if env.local_rank == 0 else then

    def materialize(path, config, dtype, device):
        return load_model(path, mesh, config=config, dtype=dtype, device=device)

    pipe = load(model_id_or_dir, dtype=dtype, device=device, cache_dir=cache_dir, progress=progress and env.is_rank0,
                materialize=materialize, pipeline_class=TensorParallelPipeline, resolve_step=local_rank0_first,
                load_step=lambda step: agree("loading the checkpoint", step))
    pipe.budget_text_config = rank_text_config(pipe.config.text, mesh.size())  # load_model checked the size
    return pipe


class TensorParallelPipeline(Pipeline):
    """The single-process Pipeline, run in lockstep on every rank. Steps a rank can fail on its own (its copy
    of the media, its memory check) are agreed on (launch.agree); a peer that stops during generation
    becomes one ``RankFailedError`` here; a sampled run without a seed gets one seed for all ranks."""

    def prepare(self, *args, **kwargs):
        return agree("preparing the request", lambda: super(TensorParallelPipeline, self).prepare(*args, **kwargs))

    def stream_batch(self, requests, **kwargs):
        if kwargs.get("temperature", 0.0) > 0:
            kwargs["seed"] = shared_seed(kwargs.get("seed"))
        if requests and kwargs.get("max_new_tokens", 128) >= 1:
            agree("checking memory", lambda: memory_budget(
                self.budget_text_config or self.config.text, len(requests), max(len(r.input_ids) for r in requests),
                kwargs.get("max_new_tokens", 128), self.model.dtype, self.model.device,
                self.model.language_model).check())
        try:
            yield from super().stream_batch(requests, **kwargs)
        except dist.DistError as e:  # a peer went away in the middle of a collective
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise RankFailedError(f"another rank stopped during generation ({first}); its own message, if it "
                                  f"had one, is above") from None
        except Exception as e:
            report_own_failure(dist_env(), f"error: {e}")
            raise


def load_pipeline(model_id_or_dir, *, dtype: torch.dtype | None = None, device: str = "cpu", cache_dir=None,
                  progress: bool = True, quantize: str | None = None, group_size: int | None = None,
                  adapter=None, activations: Activations = "float") -> Pipeline:
    """What ``llava-next run`` loads: ``Pipeline.from_pretrained`` in a single process (``quantize``: int8 / int4
    weights, see model/quant.py); under torchrun (WORLD_SIZE > 1) the process group, rank-0-only output and
    ``load_tensor_parallel`` (bf16/fp32 weights only)."""
    env = dist_env()
    if not env.is_distributed:
        return Pipeline.from_pretrained(model_id_or_dir, dtype=dtype, device=device, cache_dir=cache_dir,
                                        progress=progress, quantize=quantize, group_size=group_size, adapter=adapter,
                                        activations=activations)
    if adapter is not None:
        raise TensorParallelError("--adapter is not supported under torchrun yet: the tensor-parallel decoder "
                                  "loads the base weights only; run with the adapter in one process")
    if quantize is not None:
        raise TensorParallelError(f"--quantize {quantize} is not supported under torchrun: the tensor-parallel "
                                  "decoder splits bf16/fp32 weights; run quantized in one process, or without --quantize")
    rank0_output(env)
    mesh = init_mesh(torch.device(device).type)
    return load_tensor_parallel(model_id_or_dir, mesh, dtype=dtype, device=device, cache_dir=cache_dir,
                                progress=progress)


def shared_seed(seed: int | None) -> int | None:
    """``seed``, or (None) one random seed drawn on rank 0 and broadcast, so every rank samples alike."""
    if seed is not None or not dist.is_initialized():
        return seed
    box = [int.from_bytes(os.urandom(4), "little") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_decoder_bytes(model: LlavaNextModel) -> int:
    """Bytes of the decoder weights this process holds (DTensors: the local shard)."""
    total = 0
    for p in model.language_model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
