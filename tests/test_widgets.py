import math

import pytest
import torch

from kdcourse.widgets import TemperatureExplorer, bars_html


def test_slider_updates_probs_entropy_and_chart():
    z = torch.tensor([8.5, 7.8, 6.2, 0.1, -2.3])
    ex = TemperatureExplorer(z, ["golden", "labrador", "shepherd", "cat", "car"], T=1.0)
    h1, chart1, text1 = ex.entropy, ex.chart.value, ex.readout.value
    assert ex.probs.numpy().round(3).tolist()[:3] == [0.626, 0.311, 0.063]
    ex.slider.value = 4.0  # fires the observer synchronously
    assert ex.T == 4.0 and ex.entropy > h1
    assert ex.chart.value != chart1 and ex.readout.value != text1
    assert f"{ex.entropy:.3f} bits" in ex.readout.value
    ex.slider.value = 20.0
    assert ex.entropy < math.log2(5) and ex.entropy > 2.0


def test_dropdown_switches_inputs_and_images():
    logits = {"a": torch.tensor([5.0, 0.0, 0.0]), "b": torch.tensor([0.0, 0.0, 5.0])}
    ex = TemperatureExplorer(logits, ["x", "y", "z"], images={"a": torch.zeros(3, 8, 8)})
    assert int(ex.probs.argmax()) == 0 and "<img" in ex.picture.value
    ex.choice.value = "b"
    assert int(ex.probs.argmax()) == 2 and ex.picture.value == ""


def test_bars_html_widths():
    html = bars_html([0.5, 0.25], ["a", "b"], width_px=100)
    assert "width:50.0px" in html and "width:25.0px" in html


def test_bad_arguments():
    with pytest.raises(ValueError, match="class_names"):
        TemperatureExplorer(torch.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match="T="):
        TemperatureExplorer(torch.zeros(2), ["a", "b"], T=100.0)
