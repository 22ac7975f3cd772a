"""Interactive explorers for the labs (ipywidgets).

The logic lives here and is unit-tested headlessly: setting a control's
``.value`` fires its observers synchronously, so a test can move the slider
and read the new probabilities, entropy and chart.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Mapping, Sequence

import torch

from .losses import entropy_bits, soft_targets


def bars_html(probs: Sequence[float], names: Sequence[str], width_px: int = 260) -> str:
    """A horizontal bar chart of probabilities as plain HTML (no plotting
    library, so it renders the same in every front end and in tests)."""
    rows = []
    for name, p in zip(names, probs):
        w = max(0.0, min(1.0, float(p))) * width_px
        rows.append(
            f'<div class="kd-bar-row" style="display:flex;align-items:center;gap:6px;font-family:monospace">'
            f'<span style="width:11em;text-align:right;white-space:nowrap">{html.escape(str(name))}</span>'
            f'<span class="kd-bar" data-p="{float(p):.6f}" style="display:inline-block;height:14px;'
            f'width:{w:.1f}px;background:#3b7dd8"></span><span>{float(p):.3f}</span></div>'
        )
    return '<div class="kd-bars">' + "".join(rows) + "</div>"


def _png_data_uri(image_chw: torch.Tensor, mean, std, scale: int = 4) -> str:
    from PIL import Image

    x = image_chw.detach().cpu().float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class TemperatureExplorer:
    """A temperature slider over softmax(logits / T) with an entropy readout.

    Args:
        logits: a mapping ``label -> (C,) logits`` (a dropdown chooses among
            them) or a single (C,) tensor.
        class_names: the C class names.
        images: optional mapping ``label -> (3, H, W)`` normalised image shown
            beside the chart, with ``mean``/``std`` to undo normalisation.
        T: initial temperature; ``T_min``/``T_max``/``T_step`` bound the slider.

    Attributes after every change: ``probs`` (C,), ``entropy`` (bits),
    ``readout`` (HTML widget), ``chart`` (HTML widget), ``widget`` (the box to
    display).
    """

    def __init__(self, logits, class_names: Sequence[str], images: Mapping | None = None, T: float = 1.0,
                 T_min: float = 0.25, T_max: float = 20.0, T_step: float = 0.25,
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        import ipywidgets as W

        if isinstance(logits, torch.Tensor):
            logits = {"logits": logits}
        if not logits:
            raise ValueError("logits must be a tensor or a non-empty mapping label -> tensor")
        self.logits = {k: torch.as_tensor(v, dtype=torch.float64).flatten() for k, v in logits.items()}
        self.class_names = list(class_names)
        for k, v in self.logits.items():
            if v.numel() != len(self.class_names):
                raise ValueError(f"logits[{k!r}] has {v.numel()} values but class_names has {len(self.class_names)}")
        if not T_min <= T <= T_max:
            raise ValueError(f"T={T} must lie in [T_min, T_max] = [{T_min}, {T_max}]")
        self.images = dict(images or {})
        self.mean, self.std = mean, std

        self.slider = W.FloatSlider(value=T, min=T_min, max=T_max, step=T_step, description="T",
                                    continuous_update=True, readout_format=".2f")
        self.choice = W.Dropdown(options=list(self.logits), description="input")
        self.readout = W.HTML()
        self.chart = W.HTML()
        self.picture = W.HTML()
        self.slider.observe(self._update, names="value")
        self.choice.observe(self._update, names="value")
        controls = [self.slider] + ([self.choice] if len(self.logits) > 1 else [])
        self.widget = W.VBox([W.HBox(controls), self.readout, W.HBox([self.picture, self.chart])])
        self.widget.add_class("kd-temperature-explorer")
        self._update()

    @property
    def T(self) -> float:
        return float(self.slider.value)

    def _update(self, change=None) -> None:
        z = self.logits[self.choice.value]
        self.probs = soft_targets(z, self.T)
        self.entropy = float(entropy_bits(self.probs))
        h_max = math.log2(len(self.class_names))
        top = int(self.probs.argmax())
        self.readout.value = (
            f'<span class="kd-entropy" data-bits="{self.entropy:.6f}">T = {self.T:.2f} — entropy '
            f"<b>{self.entropy:.3f} bits</b> (0 = one-hot, max log2({len(self.class_names)}) = {h_max:.3f}); "
            f"top class {html.escape(self.class_names[top])} at {float(self.probs[top]):.3f}</span>"
        )
        self.chart.value = bars_html(self.probs.tolist(), self.class_names)
        img = self.images.get(self.choice.value)
        self.picture.value = f'<img src="{_png_data_uri(img, self.mean, self.std)}" title="{html.escape(str(self.choice.value))}"/>' \
            if img is not None else ""

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
