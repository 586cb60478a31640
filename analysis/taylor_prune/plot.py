"""Fig. 5: kept channels per block for Q/K, V and the FFN hidden layer; under a latency target, where the
latency went."""
from __future__ import annotations

import pandas as pd

from analysis.taylor_prune.tables import GROUP_LABELS


def plot(blocks: pd.DataFrame, title: str):
    """Fig. 5: kept output channels / block input channels per block for Q/K, V and the FFN hidden layer (solid:
    after pruning, dotted: before), the kept input width if it was pruned, and the paper's observation checked on
    the early blocks. A table with latency columns (a latency target) adds a panel of ms per block and kind."""
    from matplotlib.figure import Figure

    timed = "ffn_ms" in blocks
    fig = Figure(figsize=(max(6.5, 0.5 * len(blocks) + 4.5), 7.4 if timed else 4.4), layout="constrained")
    ax, *rest = fig.subplots(2 if timed else 1, 1, squeeze=False, sharex=True)[:, 0]
    for (kind, label), marker in zip(GROUP_LABELS.items(), "os^"):
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
    if timed:
        _plot_ms(rest[0], blocks)
    return fig


def _plot_ms(ax, blocks: pd.DataFrame) -> None:
    """Per block, the ms each kind's channels cost by the latency table, stacked: before (outlined, left) and
    after (filled, right)."""
    width = 0.38
    for column, offset, filled in (("ms_before", -width / 2, False), ("ms", width / 2, True)):
        bottom = 0.0
        for (kind, label), color in zip(GROUP_LABELS.items(), ("C0", "C1", "C2")):
            ms = blocks[f"{kind}_{column}"].fillna(0)
            ax.bar(blocks.block + offset, ms, width, bottom=bottom, color=color if filled else "none",
                   edgecolor=color, label=label if filled else None)
            bottom = bottom + ms
    ax.set(xlabel="block", ylabel="ms (latency table)", xticks=list(blocks.block),
           title="latency of each kind's channels per block: outlined before, filled after")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
