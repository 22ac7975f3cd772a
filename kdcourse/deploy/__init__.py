"""Deployment: honest latency and size, real INT8, saved artefacts.

:mod:`.measure` (latency p50/p99, size, MACs, table rows), :mod:`.tables`
(Lab 5's variant, memory, BERT and ResNet tables), :mod:`.onnx`
(export, ONNX Runtime, INT8 quantizers, op counts), :mod:`.pt2e` (torch.export,
torchao PT2E, compile). Everything is re-exported here (``from kdcourse import deploy``).

    lat = measure_latency(model, torch.randn(1, 3, 32, 32), threads=2)   # p50/p99 in ms
    size_mb(model)                                      # bytes on disk / 1e6
    path = export_onnx(student, example, "student.onnx")   # torch.onnx.export(dynamo=True)
    qpath = quantize_static_onnx(path, "student-int8.onnx", calibration_batches(data.train))
    int8 = OnnxModel(qpath, threads=2)                  # tensor in, logits out
    conv_precision(qpath)                               # {'int8': 5, 'float': 0}

What is measured, and how
-------------------------
* **Latency** (:func:`measure_latency`): ``warmup`` untimed calls, then
  ``runs`` calls each timed with ``time.perf_counter``; p50 and p99 in
  milliseconds. PyTorch's thread count is set for the measurement and
  restored afterwards; an :class:`OnnxModel` has its own thread count, fixed
  when its session is created. ``repeats > 1`` repeats the whole measurement
  and reports the median of the repeats' percentiles; :func:`compare_latency`
  interleaves the repeats of several models, so that a burst of load from
  other programs on a shared CPU hits all of them alike.
* **Size** (:func:`size_mb`): the model serialised to a temporary file
  (``torch.save`` of the state dict, ``torch.export.save``) or the artefact
  file itself, in MB of 10^6 bytes.
* **Which layers are really INT8**: :func:`module_types` counts leaf module
  types (after ``quantize_dynamic`` a ``Conv2d`` is still a ``Conv2d``);
  :func:`onnx_op_types` counts the nodes of an ONNX file and
  :func:`runtime_op_types` the kernels ONNX Runtime actually runs after its
  graph optimisations; :func:`conv_precision` classifies every convolution.

The INT8 stacks
---------------
* **Static INT8 for convolutions** (:func:`quantize_static_onnx`): the model
  is exported with ``torch.onnx.export(..., dynamo=True)`` and quantized by
  ONNX Runtime's ``quantize_static`` in QDQ format, per-channel weights
  (``QInt8``) and unsigned activations (``QUInt8``) calibrated on real
  training images. On x86 ONNX Runtime fuses every QDQ-wrapped ``Conv`` into
  a ``QLinearConv`` only with unsigned activations; with signed (``QInt8``)
  activations part of the convolutions stay in float — count them with
  :func:`conv_precision`.
"""
from ..runtime import num_threads  # noqa: F401
from ._common import DEFAULT_THREADS, _as_args, _batch_size, _eval  # noqa: F401
from .measure import (Latency, _summarise, _threads_of, _time_calls, agreement, compare_latency,  # noqa: F401
                      count_macs, count_params, measure_latency, percentiles, predict, size_mb, variant_row)
from .onnx import (OnnxModel, _is_int8_kernel, _load_onnx, _quant_type, _quiet, _reader, _session,  # noqa: F401
                   calibration_batches, conv_precision, export_onnx, float_layers, module_types, onnx_op_types,
                   qdq_wrapped, quantize_dynamic_onnx, quantize_static_onnx, runtime_op_types, seed_recipe_dynamic,
                   weight_scales_per_channel)
from .pt2e import compile_frozen, load_exported, pt2e_conv_precision, quantize_pt2e, save_exported, torchao_version  # noqa: F401
from .tables import VariantTable, bert_table, int8_change_line, memory_table, network_table, target_line, variant_table  # noqa: F401
