"""Lab 5's deployment tables: one row per model variant, measured here.

Each function takes what the notebook measured (variants, latencies from
:func:`~kdcourse.deploy.measure.compare_latency`) and the student's own
``tail(latency) -> (column name, ms)`` — the tail percentile their
``latency_summary`` trusts for that many calls — and returns rows for
:func:`kdcourse.runs.show_table` (strings, formatted once, here).

    table = variant_table(variants, ds.test, x1, lats, tail)
    runs.show_table(table)
    print(int8_change_line(table, lats, len(ds.test)))
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn

from . import memory
from .measure import agreement, count_macs, count_params, predict, size_mb, variant_row


class VariantTable(list):
    """:func:`variant_table`'s rows (strings, for :func:`kdcourse.runs.show_table`)
    with ``measured``: each variant's unrounded figures by name, which the
    lines written from the table read (a ratio of two rounded sizes is not the
    ratio of the sizes)."""

    def __init__(self, rows, measured: dict):
        super().__init__(rows)
        self.measured = measured


def variant_table(variants: Mapping[str, tuple], split, example, latencies: Mapping, tail: Callable) -> VariantTable:
    """``variants`` maps a name to ``(model, what size_mb measures, reference
    model)``: params and MACs of the reference, size, p50, the tail column,
    test accuracy on ``split`` and agreement with the reference model's
    predictions. Each reference is run and counted once, however many
    variants share it."""
    refs: dict = {}
    for name, (model, sized, ref) in variants.items():
        if id(ref) not in refs:
            refs[id(ref)] = (predict(ref, split), count_params(ref), count_macs(ref, example))
    rows, measured = [], {}
    for name, (model, sized, ref) in variants.items():
        ref_logits, n_params, macs = refs[id(ref)]
        row = variant_row(name, model, split, example, size=sized, params=n_params,
                          reference_logits=ref_logits, latency=latencies[name])
        measured[name] = {**row, "MACs": macs}
        tail_name, tail_ms = tail(latencies[name])
        rows.append({"model": name, "params": f"{row['params']:,}", "MMAC/image": f"{macs / 1e6:.2f}",
                     "size (MB)": f"{row['size MB']:.3f}", "p50 (ms)": f"{row['p50 ms']:.3f}", tail_name: f"{tail_ms:.3f}",
                     "test acc (%)": f"{row['accuracy %']:.2f}", "agrees with fp32 (%)": f"{row['agreement %']:.1f}"})
    return VariantTable(rows, measured)


def int8_change_line(table: VariantTable, latencies: Mapping, n_test: int, fp32: str = "student fp32 (PyTorch)",
                     fp32_runtime: str = "student fp32 (ONNX Runtime)", int8: str = "student INT8 (ONNX Runtime)") -> str:
    """What INT8 changed, from a :func:`variant_table`'s unrounded figures:
    accuracy (in points, against one image's worth), p50 in the runtime,
    file size."""
    if not isinstance(table, VariantTable):
        raise TypeError(f"int8_change_line: table must be what deploy.variant_table returned, got {type(table).__name__}")
    by_name = table.measured
    for name in (fp32, fp32_runtime, int8):
        if name not in by_name or name not in latencies:
            raise KeyError(f"int8_change_line: no row and latency named {name!r}; rows: {', '.join(by_name)}")
    drop = by_name[fp32]["accuracy %"] - by_name[int8]["accuracy %"]
    return (f"INT8 changes the student's test accuracy by {-drop:+.2f} points on {n_test} images "
            f"(one image = {100 / n_test:.2f} points); p50 in ONNX Runtime "
            f"{latencies[fp32_runtime].p50_ms:.3f} ms (fp32) -> {latencies[int8].p50_ms:.3f} ms (INT8); "
            f"file {by_name[fp32_runtime]['size MB'] / by_name[int8]['size MB']:.1f}x smaller")


def target_line(name: str, latency, tail: Callable, target_ms: float) -> str:
    """Whether ``name``'s tail latency meets the handout's target at batch 1."""
    tail_name, tail_ms = tail(latency)
    return (f"the handout's target, < {target_ms:g} ms at batch 1: {name} p50 {latency.p50_ms:.3f} ms, "
            f"{tail_name.replace(' (ms)', '')} {tail_ms:.3f} ms -> {'met' if tail_ms < target_ms else 'NOT met'}")


def memory_table(variants: Mapping[str, tuple], example: torch.Tensor, threads: int) -> list[dict]:
    """Memory of each variant (``name -> (model, artefact, reference)``): for a
    PyTorch module its activations (all layers, the largest), for an exported
    file the peak RSS growth of a fresh process running it; and the size."""
    rows = []
    for name, (model, sized, _ref) in variants.items():
        if isinstance(model, nn.Module):
            a = memory.activation_bytes(model, example)
            rows.append({"model": name, "activations, all layers (MB)": f"{a.total_mb:.3f}",
                         "largest activation (MB)": f"{a.largest_mb:.3f} ({a.largest_layer})", "peak RSS growth (MB)": "",
                         "size (MB)": f"{size_mb(sized):.3f}"})
        else:
            r = memory.peak_rss_mb(sized, tuple(example.shape), threads=threads)
            rows.append({"model": name, "activations, all layers (MB)": "", "largest activation (MB)": "",
                         "peak RSS growth (MB)": f"{r.model_mb:.1f} (process {r.process_mb:.0f})",
                         "size (MB)": f"{size_mb(sized):.3f}"})
    return rows


def bert_table(variants: Mapping[str, tuple], tokens: torch.Tensor, reference_logits: torch.Tensor,
               latencies: Mapping, tail: Callable) -> list[dict]:
    """``variants`` maps a name to ``(model, what size_mb measures)``; each
    model is called as ``model(tokens, mask)`` on all-ones masks: size, p50,
    the tail column, agreement with ``reference_logits`` and the largest logit difference."""
    rows = []
    for name, (model, sized) in variants.items():
        with torch.inference_mode():
            out = model(tokens, torch.ones_like(tokens))
        tail_name, tail_ms = tail(latencies[name])
        rows.append({"model": name, "size (MB)": f"{size_mb(sized):.2f}", "p50 (ms)": f"{latencies[name].p50_ms:.2f}",
                     tail_name: f"{tail_ms:.2f}", "agrees with fp32 (%)": f"{100 * agreement(out, reference_logits):.1f}",
                     "max |logit diff|": f"{float((out - reference_logits).abs().max()):.3f}"})
    return rows


def network_table(nets: Mapping[str, tuple], latencies: Mapping, macs: Mapping[int, int], tail: Callable) -> list[dict]:
    """``nets`` maps a name to ``(model, size source, params, convolutions)``,
    convolutions a string or :func:`~kdcourse.deploy.conv_precision`'s dict;
    ``macs`` maps a parameter count to the MACs of one image."""
    rows = []
    for name, (_model, sized, n_params, cp) in nets.items():
        tail_name, tail_ms = tail(latencies[name])
        rows.append({"model": name, "params": f"{n_params:,}", "GMAC/image": f"{macs[n_params] / 1e9:.2f}",
                     "size (MB)": f"{size_mb(sized):.1f}", "p50 (ms)": f"{latencies[name].p50_ms:.2f}",
                     tail_name: f"{tail_ms:.2f}", "convs int8/float": cp if isinstance(cp, str) else f"{cp['int8']}/{cp['float']}"})
    return rows
