"""Token-weight views written into the run dir: an HTML page of coloured tokens, a histogram PNG,
and ``weights.npz`` (flat arrays, read by the report and the notebooks)."""
from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import torch

from tisdpo.constants import IGNORE_INDEX, SIDES

log = logging.getLogger(__name__)


def _colour(weight: float, low: float, high: float) -> str:
    """Red below 1, green above 1, white at 1; saturation by distance to 1 within [low, high]."""
    if weight >= 1.0:
        share = min(1.0, (weight - 1.0) / max(high - 1.0, 1e-6))
        return f"rgba(40,167,69,{0.15 + 0.7 * share:.2f})"
    share = min(1.0, (1.0 - weight) / max(1.0 - low, 1e-6))
    return f"rgba(220,53,69,{0.15 + 0.7 * share:.2f})"


def render_html(tokenizer, examples, weights, true_rewards=None, n_examples: int = 20) -> str:
    flat = torch.cat([w for side in SIDES for w in weights[side] if len(w)])
    low, high = float(flat.min()), float(flat.max())
    parts = [
        "<html><head><meta charset='utf-8'><style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".tok{padding:1px 2px;margin:1px;border-radius:3px;display:inline-block}"
        ".harm{border-bottom:3px solid #000}</style></head><body>",
        f"<h1>Token weights</h1><p>{len(examples)} training pairs; weights in [{low:.3f}, {high:.3f}]. "
        "Green: weight above 1; red: below 1; hover for the value. Underlined: negative true reward (built-in task).</p>",
    ]
    for i, example in enumerate(examples[:n_examples]):
        prompt_ids = [t for t, label in zip(example["chosen_input_ids"], example["chosen_labels"]) if label == IGNORE_INDEX]
        parts.append(f"<h3>pair {example['index']}</h3><p><b>prompt</b>: {html.escape(tokenizer.decode(prompt_ids, skip_special_tokens=True))}</p>")
        for side in SIDES:
            ids = [t for t, label in zip(example[f"{side}_input_ids"], example[f"{side}_labels"]) if label != IGNORE_INDEX]
            truth = (true_rewards or {}).get(side)
            spans = []
            for k, (token, w) in enumerate(zip(ids, weights[side][i].tolist())):
                text = html.escape(tokenizer.decode([token]))
                r = truth[i][k] if truth is not None and k < len(truth[i]) else None
                title = f"w={w:.3f}" + (f", true r={r:.2f}" if r is not None else "")
                cls = "tok harm" if r is not None and r < 0 else "tok"
                spans.append(f"<span class='{cls}' title='{title}' style='background:{_colour(w, low, high)}'>{text}</span>")
            parts.append(f"<p><b>{side}</b>: {''.join(spans)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_weight_views(output_dir: Path, tokenizer, examples, weights, scores=None, true_rewards=None) -> None:
    output_dir = Path(output_dir)
    arrays = {f"{side}_weights": torch.cat(weights[side]).numpy() if weights[side] else np.zeros(0) for side in SIDES}
    arrays.update({f"{side}_lengths": np.array([len(w) for w in weights[side]]) for side in SIDES})
    if scores is not None:
        arrays.update({f"{side}_scores": torch.cat(scores[side]).numpy() for side in SIDES})
    np.savez_compressed(output_dir / "weights.npz", **arrays)
    page = render_html(tokenizer, examples, weights, true_rewards)
    (output_dir / "token_weights.html").write_text(page)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for side in SIDES:
            ax.hist(arrays[f"{side}_weights"], bins=50, alpha=0.6, label=side)
        ax.set_xlabel("token weight")
        ax.set_ylabel("tokens")
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / "weights_hist.png", dpi=100)
        plt.close(fig)
    except Exception as error:  # a plotting failure must not fail the run; say so
        log.warning("weight histogram not written: %s", error)
    log.info("token weights: %s, %s", output_dir / "token_weights.html", output_dir / "weights_hist.png")
