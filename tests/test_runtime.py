"""--device / --precision / --num-workers of eval, predict and heatmap; the Q-Former's gradient
checkpointing; whole-bag mixing without copies."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import make_batch, tiny_config
from pathm3.cli import eval_main, heatmap_main, predict_main
from pathm3.errors import UsageError, run_cli
from pathm3.pretrained import build_model
from pathm3.runtime import autocast, resolve_device
from pathm3.text import build_word_tokenizer


def test_devices_resolve_or_fail_in_one_line():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(UsageError, match="use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device on this machine"):
            resolve_device("cuda:1")
    with pytest.raises(UsageError, match="precision 'fp8'"):
        autocast(torch.device("cpu"), "fp8")


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_predict_in_bf16_and_with_workers_agrees_with_fp32(trained_run, tmp_path):
    ckpt = str(trained_run / "checkpoints" / "best.safetensors")
    bags = str(trained_run.parents[2] / "cohort" / "bags")
    runs = {"fp32": [], "workers": ["--num-workers", "2"], "bf16": ["--precision", "bf16", "--device", "auto"]}
    for name, flags in runs.items():
        args = ["--checkpoint", ckpt, bags, "--output", str(tmp_path / f"{name}.csv"), "--no-progress", *flags]
        assert run_cli(predict_main, args) == 0
    a, w, b = (_rows(tmp_path / f"{name}.csv") for name in runs)
    assert a == w  # streamed by worker processes: the same file
    probs = lambda rows: torch.tensor([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])  # noqa: E731
    pa, pb = probs(a), probs(b)
    assert (pa - pb).abs().max() < 0.05  # bf16 matrix products, fp32 weights
    clear = (pa.max(1).values - 1 / pa.shape[1]) > 0.05  # slides not on the decision boundary
    assert torch.equal(pa.argmax(1)[clear], pb.argmax(1)[clear])


def test_eval_takes_device_precision_and_workers(trained_run, tmp_path):
    ckpt = str(trained_run / "checkpoints" / "best.safetensors")
    out = tmp_path / "m.json"
    assert run_cli(eval_main, ["--checkpoint", ckpt, "--output", str(out), "--device", "cpu", "--precision", "bf16",
                               "--num-workers", "1", "--no-progress"]) == 0
    assert json.loads(out.read_text())["classification"]["image_only"]["accuracy"] is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_a_one_line_error(trained_run, tmp_path, capsys):
    ckpt = str(trained_run / "checkpoints" / "best.safetensors")
    bag = next((trained_run.parents[2] / "cohort" / "bags").glob("*.h5"))
    for main, args in ((eval_main, ["--output", str(tmp_path / "m.json")]),
                       (heatmap_main, ["--bag", str(bag), "--output", str(tmp_path / "h")])):
        assert run_cli(main, ["--checkpoint", ckpt, "--device", "cuda", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA device on this machine" in err[0]
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "h").exists()


def test_heatmap_in_bf16_ranks_like_fp32(trained_run, tmp_path):
    ckpt = str(trained_run / "checkpoints" / "best.safetensors")
    bag = next((trained_run.parents[2] / "cohort" / "bags").glob("*.h5"))
    tops = []
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert run_cli(heatmap_main, ["--checkpoint", ckpt, "--bag", str(bag), "--output", str(out),
                                      "--precision", precision, "--no-progress"]) == 0
        rows = _rows(next(out.glob("*_scores.csv")))
        tops.append({r["x"] + "," + r["y"] for r in rows if int(r["rank"]) <= 3})
    assert len(tops[0] & tops[1]) >= 2


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    bags = [torch.randn(60, 64), torch.randn(45, 64)]
    grads = []
    for on in (False, True):
        cfg = tiny_config(f"model.aggregator.gradient_checkpointing={on}", "model.aggregator.dropout=0",
                          "model.mixer.dropout=0", "model.head.dropout=0", "model.patch_dropout=0",
                          "model.aggregator.text_input=always")
        torch.manual_seed(1)
        model = build_model(cfg, build_word_tokenizer(["benign glands", "tumour cells"])).train()
        batch = make_batch(model, bags, [0, 1], ["benign glands", "tumour cells"])
        out = model(batch)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.aggregator.qformer.modules())


def test_one_unpadded_bag_mixes_like_a_padded_batch():
    cfg = tiny_config("model.mixer.dropout=0")
    model = build_model(cfg, build_word_tokenizer(["x"])).eval()
    bag = torch.randn(1, 70, 64)
    alone = model.mixer(bag, torch.ones(1, 70, dtype=torch.bool))
    padded = torch.cat([bag, torch.zeros(1, 10, 64)], 1)
    mask = torch.ones(1, 80, dtype=torch.bool)
    mask[0, 70:] = False
    assert torch.allclose(alone, model.mixer(padded, mask)[:, :70], atol=1e-6)
