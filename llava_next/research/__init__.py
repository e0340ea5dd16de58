"""Research instruments: token provenance and selectors, named hook points, traces reduced on the fly, exact
attention statistics without T x T maps, a streaming logit lens, interventions and pictures (see each
module's docstring).

    from llava_next.research import Provenance, select as sel
    from llava_next.research import trace, Record, Attention, LogitLens, ablate, knockout, patch
    from llava_next.research import Inputs, Target, input_x_gradient, integrated_gradients, rollout, relevancy
"""

from . import select
from ..reduce.fastv import fastv_score
from .attribution import Attribution, Inputs, Target, input_x_gradient, integrated_gradients
from .attribution_patching import activation_patching, attribution_patching
from .attention import AttentionStats, ResearchError, attention_rows, attention_stats
from .cache import ActivationCache, direct_logit_attribution
from ..model.attention import grouped_attention
from .interventions import ablate, intervene, knockout, patch, replace_embedding
from .logit_lens import LensResult, LogitLens
from .provenance import KINDS, SEGMENTS, Media, Provenance
from .relevancy import dense_attention, relevancy, rollout
from .trace import Attention, Record, Step, Trace, hooks, resolve_positions, run_with_cache, run_with_hooks, trace
from .weights import Weights

__all__ = ["ActivationCache", "Attention", "AttentionStats", "Attribution", "Inputs", "KINDS", "LensResult",
           "LogitLens", "Media", "Provenance", "Record", "ResearchError", "SEGMENTS", "Step", "Target", "Trace",
           "ablate", "activation_patching", "attention_rows", "attention_stats", "attribution_patching",
           "dense_attention", "direct_logit_attribution", "fastv_score", "input_x_gradient", "integrated_gradients",
           "relevancy", "rollout",
           "grouped_attention", "hooks", "intervene", "knockout", "patch", "replace_embedding", "resolve_positions",
           "run_with_cache", "run_with_hooks", "select", "trace", "Weights"]
