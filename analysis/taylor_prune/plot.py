"""Fig. 5: kept channels per block for Q/K, V and the FFN hidden layer."""
from __future__ import annotations

import pandas as pd

from analysis.taylor_prune.tables import KINDS


def plot(blocks: pd.DataFrame, title: str):
    """Fig. 5: kept output channels / block input channels per block for Q/K, V and the FFN hidden layer (solid:
    after pruning, dotted: before), the kept input width if it was pruned, and the paper's observation checked on
    the early blocks."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.5, 0.5 * len(blocks) + 4.5), 4.4), layout="constrained")
    ax = fig.subplots()
    for (kind, label), marker in zip(KINDS.items(), "os^"):
        line, = ax.plot(blocks.block, blocks[f"{kind}_ratio"], marker=marker, label=label)
        ax.plot(blocks.block, blocks[f"{kind}_ratio_before"], ls=":", lw=0.8, color=line.get_color())
    if (blocks.width_kept != 1).any():
        ax.plot(blocks.block, blocks.width_kept, ls="--", color="gray", marker=".",
                label="input width\n(kept / original)")
    for boundary in blocks.block[blocks.stage.diff().fillna(0) != 0]:
        ax.axvline(boundary - 0.5, color="gray", lw=0.5)
    early = blocks.iloc[:max(1, len(blocks) // 3)]
    note = (f"first third of the blocks: V {early.v_ratio.mean():.2f}, Q/K {early.qk_ratio.mean():.2f} of the input "
            f"width (paper: V stays close to it, Q/K and FFN are cut more)")
    ax.set(xlabel=f"block\n{note}", ylabel="channels / block input channels", title=title, xticks=list(blocks.block))
    ax.xaxis.label.set_fontsize(8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="solid: after\ndotted: before", title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    return fig
