"""Taylor structured pruning (paper Fig. 5): which channels a trained ViT keeps, per block, and the EfficientViT
channel allocation that follows from it.

    python -m analysis.taylor_prune --model deit_proxy                 # trained proxy, prune to 50% of MACs
    python -m analysis.taylor_prune --model swin_proxy --target-macs 0.6 --finetune-epochs 1
    python -m analysis.taylor_prune --model deit_tiny --data imagefolder:/data/imagenet   # hub weights
    python -m analysis.taylor_prune --model deit_proxy --target-latency 0.6     # to 60% of its measured CPU latency

Importance (Molchanov et al., CVPR 2019): the first-order Taylor estimate |w * dL/dw| of every weight, with
gradients accumulated over real data batches, summed per channel in each layer the channel lives in, reduced over
those layers and normalized per group exactly as torch-pruning's GroupTaylorImportance(bias=True) does (same
`--normalizer` / `--reduction` names and formulas; a test checks it), except that norm layers' affine weights and
bare parameters (class token, position embedding, LayerScale) count too.

Groups (pruned separately): per block Q/K, V and FFN hidden, and the residual-stream width (one for a ViT, one per
stage where the widths differ per stage). torch-pruning's dependency graph cannot give these groups (it treats
q @ k^T like an element-wise op and ties Q/K to V, see docs/pruning.md), so a builder per known family lists them,
any other softmax-attention model has them discovered from its own forward (`builders.discovery`,
docs/pruning_discovery.md), and torch-pruning's layer pruners do the surgery. A fused qkv is split into q, k, v Linears first (the same function,
checked per family); q @ k^T keeps the model's original softmax scale, so removing channels that carry nothing
leaves the output unchanged. A unit of a Q/K or V group is one dim of every head (heads stay equal; an EVA rotary
pair for RoPE models); of an FFN or width group, one channel (of every chunk, for an evit CGA stage). Each step
recomputes the gradients, ranks all units of all groups globally by normalized importance, and removes the lowest
until the step's MAC goal is met (MACs per unit measured at the layers' real token counts), never below a floor
per group. The MAC counter adds q @ k^T and attn @ v at their pruned widths to the Linear/Conv MACs; it agrees
with fvcore on every family (tested). The families, their couplings and what each refuses: docs/pruning.md.

Outputs (folder --out, default runs/taylor_prune; the committed reference is written by experiments.reproduce): <model>.csv (one row per block: Q/K, V and FFN-hidden
widths relative to the block's input width, before and after, with MACs and params), <model>_stages.csv,
<model>_summary.csv (MACs, params, accuracy before/after, normalizer, reduction), <model>.png (Fig. 5 style) and
<model>_allocation.yaml, an EfficientViT config built from the kept ratios at a preset's FLOPs or measured
throughput (--match) (`python -m experiments.family --models evit_m0,<that yaml>` trains and times both).

The package: `groups` (Slice, Group, prune_channels), `attention` (PrunedAttention, the base of the split attentions), `builders`
(a registry of group builders, one module per family, `builders.common`, and `builders.discovery` for the rest),
`macs` (the MAC counter),
`importance` (TaylorImportance and LossChange, callables; pass another to `prune_to_target`), `latency` (LatencyModel:
per-group latency curves timed on the device and cached, for `--target-latency`, whose units are chosen by the loss
they add per latency saved, each group's least important first: docs/pruning.md), `estimate_check` (the importance
estimates against the loss change of real removals), `prune` (the loop), `saved` (a pruned model written to a file
and rebuilt from it: `--save-model`, docs/pruned_models.md), `tables`,
`allocation`, `plot`, `cli`, and `claims` (the kept fractions by thirds of the blocks and the paper's claims judged
on them, for the report).
"""
from __future__ import annotations

from analysis.taylor_prune.allocation import allocate, allocation_config
from analysis.taylor_prune.builders import prepare, prunable, register_block, register_converter, register_model
from analysis.taylor_prune.builders.vit import SplitAttention
from analysis.taylor_prune.cli import DEFAULT_OUT, Settings, main, prune_model, run
from analysis.taylor_prune.groups import Group, Slice, prune_channels
from evit.models import UnsupportedModelError
from analysis.taylor_prune.importance import (NORMALIZERS, REDUCTIONS, LossChange, TaylorImportance,
                                             accumulate_gradients)
from analysis.taylor_prune.latency import LatencyModel
from analysis.taylor_prune.macs import count_macs, measure_positions
from analysis.taylor_prune.plot import plot
from analysis.taylor_prune.prune import PruneResult, Unit, candidate_units, prune_to_target, top1_accuracy
from analysis.taylor_prune.tables import GROUP_LABELS, block_table, stage_table

__all__ = [
    "DEFAULT_OUT", "GROUP_LABELS", "LatencyModel", "LossChange", "NORMALIZERS", "REDUCTIONS", "Group", "PruneResult",
    "Settings", "Slice", "SplitAttention", "TaylorImportance", "Unit", "UnsupportedModelError",
    "accumulate_gradients", "allocate", "allocation_config", "block_table", "candidate_units", "count_macs",
    "main", "measure_positions", "plot", "prepare", "prunable", "prune_channels", "prune_model", "prune_to_target",
    "register_block", "register_converter", "register_model", "run", "stage_table", "top1_accuracy",
]
