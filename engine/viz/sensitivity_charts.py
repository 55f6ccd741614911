"""Figures and tables of the Sensitivity lab (no streamlit: the report export reuses them).

Every ``*_table`` returns the exact data its figure draws (CSV download);
every figure takes a ``subtitle`` stating what it was computed on.  KL and
ΔNLL are in nats per token.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from engine.sensitivity.agreement import Agreement, LayerScore, best_per_score
from engine.sensitivity.findings import rho_text, score_names
from engine.sensitivity.scan import ActionDamage
from engine.viz.style import PALETTE, log_ticks, padded_range, styled, wants_log

DAMAGE_COLOURS = "YlOrRd"  # sequential: light = cheap, dark = costly (monotone in log KL)
AGREEMENT_COLOURS = "RdBu"  # diverging around ρ = 0: blue = the score ranks the damage, red = backwards
VERDICT_WORDS = {"well": "ranks it well", "partly": "ranks it partly", "not": "does not rank it",
                 "backwards": "ranks it backwards"}


def damage_table(damages: list[ActionDamage]) -> pd.DataFrame:
    """One row per layer × action: mean KL and ΔNLL (nats per token) and the modified layer's facts."""
    rows = []
    for damage in damages:
        action = damage.spec
        for layer, (kl, dnll) in enumerate(zip(damage.kl, damage.delta_nll)):
            detail = damage.details[layer] if layer < len(damage.details) else {}
            rows.append({"layer": layer, "action": action.key, "action_label": action.label, "kl": kl,
                         "delta_nll": dnll, **{f"detail.{k}": v for k, v in detail.items()}})
    return pd.DataFrame(rows)


def _log_floor(values: list[float]) -> float:
    """Where KL ≤ 0 (an action that changed nothing, or float noise) is drawn on a log scale."""
    positive = [v for v in values if v > 0]
    return min(positive) / 10 if positive else 1e-12


def sensitivity_heatmap(damages: list[ActionDamage], subtitle: str) -> go.Figure:
    """Layers × actions, colour = measured KL on a log scale; hover gives KL and ΔNLL."""
    labels = [d.spec.label for d in damages]
    n_layers = damages[0].num_layers
    floor = _log_floor([v for d in damages for v in d.kl])
    z = [[math.log10(max(d.kl[layer], floor)) for d in damages] for layer in range(n_layers)]
    custom = [[[d.kl[layer], d.delta_nll[layer]] for d in damages] for layer in range(n_layers)]
    low, high = min(min(row) for row in z), max(max(row) for row in z)
    ticks = list(range(math.floor(low), math.ceil(high) + 1)) or [math.floor(low)]
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=list(range(n_layers)), customdata=custom, colorscale=DAMAGE_COLOURS,
        colorbar={"title": "KL (nats/token)", "tickvals": ticks, "ticktext": [f"1e{t}" for t in ticks]},
        hovertemplate="layer %{y} · %{x}<br>KL %{customdata[0]:.3e} nats/token<br>"
                      "ΔNLL %{customdata[1]:+.4f} nats/token<extra></extra>",
    ))
    return styled(fig, "Measured damage: KL to the dense model when one layer is changed", subtitle,
                  height=max(420, 60 + 18 * n_layers), xaxis_title="action (on this layer only)",
                  yaxis_title="layer")


def agreement_frame(rows: list[Agreement]) -> pd.DataFrame:
    """Every score × action: Spearman ρ, its bootstrap 95% interval, top-k overlap, verdict."""
    return pd.DataFrame([r.to_dict() for r in rows])


def agreement_heatmap(rows: list[Agreement], subtitle: str) -> go.Figure:
    """Score × action, colour = Spearman ρ between predicted and measured cost (−1..1), interval as text."""
    scores = list(dict.fromkeys(r.score for r in rows))
    actions = list(dict.fromkeys(r.action_label for r in rows))
    cell = {(r.score, r.action_label): r for r in rows}
    z = [[cell[s, a].rho for a in actions] for s in scores]
    text = [[f"{cell[s, a].rho:.2f}<br>[{cell[s, a].low:.2f}, {cell[s, a].high:.2f}]" for a in actions]
            for s in scores]
    fig = go.Figure(go.Heatmap(
        z=z, x=actions, y=scores, text=text, texttemplate="%{text}", colorscale=AGREEMENT_COLOURS,
        zmin=-1, zmax=1, zmid=0, colorbar={"title": "Spearman ρ"},
        hovertemplate="%{y} vs %{x}<br>ρ %{text}<extra></extra>",
    ))
    return styled(fig, "How well each score ranks the measured damage (Spearman ρ, 95% interval)", subtitle,
                  height=max(380, 90 + 48 * len(scores)), xaxis_title="action", yaxis_title="score",
                  yaxis={"autorange": "reversed"})


def compact_table(rows: list[Agreement]) -> pd.DataFrame:
    """Score → the action it predicts best, how well (ρ with interval, top-k overlap, verdict)."""
    names = score_names(rows)
    return pd.DataFrame([{
        "score": names[r.score], "predicts best": r.action_label, "Spearman ρ [95%]": rho_text(r).removeprefix("ρ = "),
        f"top-{r.top_k} overlap": f"{r.overlap:.0%}", "verdict": VERDICT_WORDS[r.verdict],
    } for r in best_per_score(rows)])


def scatter_table(score: LayerScore, damage: ActionDamage) -> pd.DataFrame:
    """Per layer: the score, its predicted-cost orientation, measured KL and ΔNLL."""
    return pd.DataFrame({"layer": range(damage.num_layers), "score": score.values, "predicted_cost": score.predicted,
                         "kl": damage.kl, "delta_nll": damage.delta_nll})


def score_scatter(score: LayerScore, damage: ActionDamage, row: Agreement, subtitle: str,
                  colour_index: int = 0) -> go.Figure:
    """Score (x) vs measured KL (y, log when it spans a decade) per layer, ρ and its interval in the title."""
    table = scatter_table(score, damage)
    log = wants_log(table["kl"])
    colour = PALETTE[colour_index % len(PALETTE)]
    fig = go.Figure(go.Scatter(
        x=table["score"], y=table["kl"], mode="markers+text", text=table["layer"], textposition="top center",
        marker={"color": colour, "size": 9}, customdata=table["delta_nll"],
        hovertemplate="layer %{text}<br>" + score.name + " %{x:.4g}<br>KL %{y:.3e}<br>"
                      "ΔNLL %{customdata:+.4f}<extra></extra>",
    ))
    styled(fig, f"{score.name} vs measured {damage.spec.label} KL<br>{rho_text(row)}", subtitle,
           xaxis_title=f"{score.name} ({score.reading})", yaxis_title="KL to dense (nats/token)", showlegend=False)
    fig.update_xaxes(range=padded_range(table["score"]))
    y_range = padded_range(table["kl"], log=log, pad=0.12)
    fig.update_yaxes(type="log" if log else "linear", range=y_range)
    if log:  # clean 1-2-5 ticks, not Plotly's minor digits
        ticks, labels = log_ticks(y_range)
        fig.update_yaxes(tickvals=ticks, ticktext=labels)
    fig.update_layout(margin={"t": 110})  # title, ρ and the 'computed on' line
    return fig
