"""Lab 5 figures: ``python -m kdcourse bench lab5 [--profile laptop] [--repeats 3]``.

1. ResNet-18 (torchvision, ``weights=None``: random init, which is fine for
   latency and size), 224x224, batch 1, 2 threads: fp32 eager, fp32
   ``torch.compile`` with freezing, fp32 ONNX Runtime, static INT8 ONNX
   Runtime (uint8 activations, and int8 activations for comparison), and
   torchao PT2E INT8 compiled with freezing when torchao is installed.
   Latencies are interleaved repeats (A, B, C, A, B, C, ...), each p50/p99
   the median over repeats; convolutions counted INT8 vs float.
   Target: INT8 p50 <= 6 ms with every convolution INT8.
2. The lab's distilled student (KD from the profile's cached teacher) on the
   offline test set: fp32 vs static INT8 accuracy, agreement, size, latency.
   Target: accuracy drop <= 1 point.
3. ResNet-50 vs ResNet-18 at 224x224 (fp32, random init), and a BERT
   classifier of the shape of Lab 3's teacher (random init) fp32 vs dynamic
   INT8 in ONNX Runtime.

The CPU may be shared with other programs: every latency is a median of
interleaved repeats; run it on a quiet machine for figures to quote.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .. import data, deploy, profiles, runs, zoo
from ..train import Distill
from .common import cli, run_all, smoke_run_all

THREADS = 2


def _latency_rows(lats: dict, extra: dict) -> list[dict]:
    rows = []
    for name, lat in lats.items():
        row = {"variant": name, "p50 ms": round(lat.p50_ms, 2), "p99 ms": round(lat.p99_ms, 2),
               "p50 per repeat": " ".join(f"{v:.2f}" for v in lat.repeat_p50s)}
        row.update(extra.get(name, {}))
        rows.append(row)
    return rows


def resnet18_int8(repeats: int, tmp: str, runs_per_repeat: int = 50, size: int = 224) -> tuple[list[dict], dict]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    calib = [torch.randn(8, 3, size, size) for _ in range(4)]  # random init: any in-range images do
    fp32_path = deploy.export_onnx(model, x, os.path.join(tmp, "resnet18.onnx"))
    u8_path = deploy.quantize_static_onnx(fp32_path, os.path.join(tmp, "resnet18-int8.onnx"), calib)
    s8_path = deploy.quantize_static_onnx(fp32_path, os.path.join(tmp, "resnet18-int8-s8act.onnx"), calib,
                                          activation_type="QInt8")
    entries = {
        "fp32 eager": (model, x),
        "fp32 ONNX Runtime": (deploy.OnnxModel(fp32_path, THREADS), x),
        "INT8 ONNX Runtime (u8 act)": (deploy.OnnxModel(u8_path, THREADS), x),
        "INT8 ONNX Runtime (s8 act)": (deploy.OnnxModel(s8_path, THREADS), x),
    }
    extra = {
        "fp32 eager": {"size MB": round(deploy.size_mb(model), 2), "convs int8/float": "0/20"},
        "fp32 ONNX Runtime": {"size MB": round(deploy.size_mb(fp32_path), 2)},
        "INT8 ONNX Runtime (u8 act)": {"size MB": round(deploy.size_mb(u8_path), 2)},
        "INT8 ONNX Runtime (s8 act)": {"size MB": round(deploy.size_mb(s8_path), 2)},
    }
    for key, path in (("fp32 ONNX Runtime", fp32_path), ("INT8 ONNX Runtime (u8 act)", u8_path),
                      ("INT8 ONNX Runtime (s8 act)", s8_path)):
        cp = deploy.conv_precision(path, THREADS)
        extra[key]["convs int8/float"] = f"{cp['int8']}/{cp['float']}"
    compile_s = {}
    with deploy.num_threads(THREADS):
        try:
            t0 = time.perf_counter()
            entries["fp32 compiled (freezing)"] = (deploy.compile_frozen(model, x), x)
            compile_s["fp32 compiled (freezing)"] = time.perf_counter() - t0
            extra["fp32 compiled (freezing)"] = {"convs int8/float": "0/20"}
        except Exception as exc:  # no C++ compiler, unsupported platform
            print(f"torch.compile unavailable here ({type(exc).__name__}: {exc}); skipping compiled fp32")
        version = deploy.torchao_version()
        if version is None:
            print("torchao is not installed: skipping the PT2E INT8 variant (pip install torchao)")
        else:
            try:
                t0 = time.perf_counter()
                q = deploy.quantize_pt2e(model, x, calib)
                cp = deploy.pt2e_conv_precision(q)
                entries[f"INT8 torchao {version} PT2E compiled"] = (deploy.compile_frozen(q, x), x)
                compile_s[f"INT8 torchao {version} PT2E compiled"] = time.perf_counter() - t0
                extra[f"INT8 torchao {version} PT2E compiled"] = {"convs int8/float": f"{cp['int8']}/{cp['float']}"}
            except Exception as exc:
                print(f"torchao PT2E failed here ({type(exc).__name__}: {exc})")
    for k, s in compile_s.items():
        print(f"  {k}: quantize/compile took {s:.0f} s (one-off)")
    lats = deploy.compare_latency(entries, runs=runs_per_repeat, warmup=10, repeats=repeats, threads=THREADS)
    return _latency_rows(lats, extra), lats


def distilled_student(profile, repeats: int, tmp: str) -> dict:
    ds = data.load(profile)
    teacher, tinfo = zoo.teacher(profile, ds, progress=False)
    run = runs.train_run("KD", profile.student, ds, lambda: Distill(teacher, T=4.0, alpha=0.9),
                         epochs=profile.student_epochs, lr=profile.lr, seed=0, keep_model=True, progress=False)
    student = run.model.cpu().eval()
    x = ds.test.images[:1].float()
    fp32_path = deploy.export_onnx(student, x, os.path.join(tmp, "student.onnx"))
    calib = deploy.calibration_batches(ds.train, n=512)
    int8_path = deploy.quantize_static_onnx(fp32_path, os.path.join(tmp, "student-int8.onnx"), calib)
    ref = deploy.predict(student, ds.test)
    fp32_onnx, int8 = deploy.OnnxModel(fp32_path, THREADS), deploy.OnnxModel(int8_path, THREADS)
    lats = deploy.compare_latency({"student fp32 eager": (student, x), "student fp32 ONNX Runtime": (fp32_onnx, x),
                                   "student INT8 ONNX Runtime": (int8, x)}, runs=200, warmup=20, repeats=repeats,
                                  threads=THREADS)
    params = deploy.count_params(student)
    rows = [
        deploy.variant_row("student fp32 eager", student, ds.test, x, reference_logits=ref,
                           latency=lats["student fp32 eager"]),
        deploy.variant_row("student fp32 ONNX Runtime", fp32_onnx, ds.test, x, params=params, reference_logits=ref,
                           latency=lats["student fp32 ONNX Runtime"]),
        deploy.variant_row("student INT8 ONNX Runtime", int8, ds.test, x, params=params, reference_logits=ref,
                           latency=lats["student INT8 ONNX Runtime"]),
    ]
    cp = deploy.conv_precision(int8_path, THREADS)
    return {"rows": rows, "convs": cp, "teacher_test_acc": tinfo["test_acc"], "n_test": len(ds.test),
            "drop_points": rows[0]["accuracy %"] - rows[2]["accuracy %"]}


def resnet50_vs_18(repeats: int, runs_per_repeat: int = 20) -> list[dict]:
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    nets = {"ResNet-50 fp32": torchvision.models.resnet50(weights=None).eval(),
            "ResNet-18 fp32": torchvision.models.resnet18(weights=None).eval()}
    lats = deploy.compare_latency({k: (m, x) for k, m in nets.items()}, runs=runs_per_repeat, warmup=5,
                                  repeats=repeats, threads=THREADS)
    return _latency_rows(lats, {k: {"params": deploy.count_params(m), "size MB": round(deploy.size_mb(m), 2)}
                                for k, m in nets.items()})


def bert(profile, repeats: int, tmp: str) -> list[dict]:
    """A BERT classifier of the shape of Lab 3's teacher for ``profile``, random weights."""
    from transformers import BertConfig, BertForSequenceClassification

    from ..transformers_kd import lab_config

    spec = lab_config(profile).teacher
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=2000, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                     num_attention_heads=spec.heads, intermediate_size=spec.intermediate, max_position_embeddings=128,
                     num_labels=2)
    model = LogitsOnly(BertForSequenceClassification(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 64))
    mask = torch.ones_like(ids)
    fp32 = deploy.export_onnx(model, (ids, mask), os.path.join(tmp, "bert.onnx"),
                              input_names=("input_ids", "attention_mask"), dynamic_axes={0: {1: "seq"}, 1: {1: "seq"}})
    q = deploy.quantize_dynamic_onnx(fp32, os.path.join(tmp, "bert-int8.onnx"))
    lats = deploy.compare_latency({"BERT fp32 eager": (model, (ids, mask)),
                                   "BERT fp32 ONNX Runtime": (deploy.OnnxModel(fp32, THREADS), (ids, mask)),
                                   "BERT dynamic INT8 ONNX Runtime": (deploy.OnnxModel(q, THREADS), (ids, mask))},
                                  runs=50, warmup=10, repeats=repeats, threads=THREADS)
    ops = deploy.onnx_op_types(q)
    return _latency_rows(lats, {
        "BERT fp32 eager": {"size MB": round(deploy.size_mb(model), 2), "params": deploy.count_params(model)},
        "BERT fp32 ONNX Runtime": {"size MB": round(deploy.size_mb(fp32), 2)},
        "BERT dynamic INT8 ONNX Runtime": {"size MB": round(deploy.size_mb(q), 2),
                                                "MatMulInteger/MatMul": f"{ops['MatMulInteger']}/{ops['MatMul']}"},
    })


class LogitsOnly(torch.nn.Module):
    """Wrap a Hugging Face classifier so that it returns the logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


PARTS = ("resnet18", "student", "resnet50", "bert", "notebook", "smoke")
NOTEBOOK = os.path.join("solutions", "05_deployment.ipynb")


def main(profile: str = "laptop", repeats: int = 3, only: tuple = PARTS) -> int:
    prof = profiles.get_profile(profile)
    print(f"lab5 benchmark — profile {prof.name}, {THREADS} threads, batch 1, {repeats} interleaved repeats; "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
          f"torchao {deploy.torchao_version() or 'not installed'}; CPU cores seen: {os.cpu_count()}, "
          f"load average now {os.getloadavg()[0]:.1f}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if "resnet18" in only:
            print("\n## ResNet-18, 224x224, batch 1 (weights=None: random init, latency only)")
            rows, lats = resnet18_int8(repeats, tmp)
            print(runs.markdown_table(rows))
            int8 = lats["INT8 ONNX Runtime (u8 act)"].p50_ms
            convs = next(r for r in rows if r["variant"] == "INT8 ONNX Runtime (u8 act)")["convs int8/float"]
            all_int8 = convs.endswith("/0")
            print(f"target INT8 p50 <= 6 ms with every convolution INT8: p50 {int8:.2f} ms, convolutions int8/float "
                  f"{convs} -> {'met' if int8 <= 6 and all_int8 else 'NOT met'}", flush=True)
            ok &= all_int8

        if "student" in only:
            print(f"\n## The distilled student ({prof.name} profile, offline test set)")
            res = distilled_student(prof, repeats, tmp)
            print(runs.markdown_table(res["rows"]))
            print(f"teacher test accuracy {100 * res['teacher_test_acc']:.2f} %; student convolutions int8/float "
                  f"{res['convs']['int8']}/{res['convs']['float']}; accuracy drop after INT8 "
                  f"{res['drop_points']:.2f} points on {res['n_test']} test images -> "
                  f"{'met' if res['drop_points'] <= 1 else 'NOT met'} (target <= 1 point)", flush=True)
            ok &= res["drop_points"] <= 1

        if "resnet50" in only:
            print("\n## ResNet-50 vs ResNet-18, 224x224, fp32 eager (random init)")
            print(runs.markdown_table(resnet50_vs_18(repeats)), flush=True)

        if "bert" in only:
            from ..transformers_kd import lab_config

            print(f"\n## BERT classifier, Lab 3's teacher shape ({lab_config(prof).teacher.describe()}), sequence 64, "
                  f"random init: fp32 vs dynamic INT8")
            print(runs.markdown_table(bert(prof, repeats, tmp)), flush=True)
    if "notebook" in only:
        print()
        run_all(NOTEBOOK, prof.name, label="teacher cached")
    if "smoke" in only:
        smoke_run_all(NOTEBOOK)
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    cli(main, PARTS, __doc__)
