"""Metric plugins that need weights: ``clip_score_drop`` runs with a locally built CLIP
model and says plainly that it is not available without one; an unavailable metric never
crashes the fidelity check, and a gate on it fails with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxopt import plugins
from fluxopt.fidelity import evaluate
from fluxopt.measure import Sample


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP (random weights) saved the way a real one is: what FLUXOPT_CLIP_MODEL points at."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fluxopt.zoo.tiny import clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    config = CLIPConfig(text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)
    return path


def _sample(image, prompt="a red cube"):
    return Sample(prompt=prompt, seed=0, image=image, latents=torch.zeros(1, 4, 4))


def _images():
    rng = np.random.default_rng(0)
    return rng.random((64, 64, 3), dtype=np.float32), rng.random((64, 64, 3), dtype=np.float32)


def test_clip_score_drop_runs_with_local_weights(clip_dir, monkeypatch):
    monkeypatch.setenv("FLUXOPT_CLIP_MODEL", str(clip_dir))
    metric = plugins.metrics()["clip_score_drop"]
    a, b = _images()
    assert metric.compute(_sample(a), _sample(a.copy())) == 0.0  # same image, same prompt: no drop
    drop = metric.compute(_sample(a), _sample(b))
    assert np.isfinite(drop) and drop != 0.0  # another image scores differently against the prompt
    assert metric.compute(_sample(b), _sample(a)) == pytest.approx(-drop, abs=1e-4)


@pytest.mark.parametrize("setting", [None, "/nonexistent/clip"])
def test_clip_score_drop_is_reported_unavailable_without_weights(monkeypatch, setting):
    if setting is None:
        monkeypatch.delenv("FLUXOPT_CLIP_MODEL", raising=False)
    else:
        monkeypatch.setenv("FLUXOPT_CLIP_MODEL", setting)
    a, b = _images()
    metrics = {k: v for k, v in plugins.metrics().items() if k in ("psnr", "clip_score_drop")}
    report = evaluate([_sample(a)], [_sample(b)], metrics, {"psnr": 1.0})
    assert report["passed"] and "psnr" in report["metrics"] and "clip_score_drop" not in report["metrics"]
    assert report["unavailable"]["clip_score_drop"].startswith("not available: needs a local CLIP model")
    gated = evaluate([_sample(a)], [_sample(b)], metrics, {"psnr": 1.0, "clip_score_drop": 5.0})
    assert not gated["passed"] and "clip_score_drop has a threshold but is not available" in gated["reason"]


# ---------------------------------------------------------------------------------- lpips
def _working_lpips() -> bool:
    try:
        import lpips  # noqa: F401 - imports torchvision, which must match torch
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _working_lpips(), reason="needs the lpips package and a torchvision built for this torch")
def test_lpips_runs_with_local_backbone_weights(tmp_path, monkeypatch):
    """A locally built (random) AlexNet stands in for torchvision's download: the metric loads it
    from the hub cache, scores identical images 0 and different ones above 0, symmetrically."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from fluxopt_plugins.lpips_distance import _model, weights_path

    weights_path().parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), weights_path())
    _model.cache_clear()
    metric = plugins.metrics()["lpips"]
    a, b = _images()
    assert metric.compute(_sample(a), _sample(a.copy())) == pytest.approx(0.0, abs=1e-6)
    d = metric.compute(_sample(a), _sample(b))
    assert d > 0 and d == pytest.approx(metric.compute(_sample(b), _sample(a)), rel=1e-4)


def test_lpips_is_reported_unavailable_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    from fluxopt_plugins.lpips_distance import ALEXNET_WEIGHTS, _model

    _model.cache_clear()
    a, b = _images()
    metrics = {k: v for k, v in plugins.metrics().items() if k in ("psnr", "lpips")}
    report = evaluate([_sample(a)], [_sample(b)], metrics, {"psnr": 1.0})
    assert report["passed"] and "lpips" not in report["metrics"]
    assert report["unavailable"]["lpips"].startswith("not available: needs torchvision's AlexNet weights")
    assert ALEXNET_WEIGHTS in report["unavailable"]["lpips"] and str(tmp_path) in report["unavailable"]["lpips"]
    gated = evaluate([_sample(a)], [_sample(b)], metrics, {"psnr": 1.0, "lpips": 0.1})
    assert not gated["passed"] and "lpips has a threshold but is not available" in gated["reason"]


@pytest.mark.skipif(_working_lpips(), reason="lpips imports here; the message for a missing package is not reachable")
def test_lpips_says_what_is_missing_when_the_package_does_not_import(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from fluxopt_plugins.lpips_distance import _model, weights_path

    weights_path().parent.mkdir(parents=True)
    weights_path().write_bytes(b"present")  # only its presence is checked before the import
    _model.cache_clear()
    with pytest.raises(Exception, match="needs the lpips package and a torchvision built for torch"):
        plugins.metrics()["lpips"].compute(_sample(_images()[0]), _sample(_images()[1]))
