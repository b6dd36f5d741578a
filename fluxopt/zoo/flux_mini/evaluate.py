"""Evidence that ``flux-mini`` learned and behaves like a trained model for caching.

* ``accuracy``: generate images for captions of held-out attribute combinations (never seen in
  training) and of training combinations, read the attributes back with
  :func:`fluxopt.zoo.flux_mini.dataset.detect`, and report accuracy per attribute against chance;
* ``residuals``: relative L1 change of the first transformer block's residual (what diffusers'
  first-block cache compares with its threshold) from one denoising step to the next;
* ``fbcache``: diffusers' FirstBlockCacheConfig at several thresholds: steps whose remaining
  blocks were skipped, and fidelity (PSNR, SSIM, latent relative L2) against the uncached run.

    python -m fluxopt.zoo.flux_mini.evaluate --out docs/results --images docs/images
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fluxopt.zoo.flux_mini import dataset
from fluxopt.zoo.flux_mini.model import MAX_SEQUENCE_LENGTH

STEPS = 28
GUIDANCE = 3.5
THRESHOLDS = (0.05, 0.08, 0.1, 0.12, 0.15, 0.2)


def load(path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped flux-mini (verified against its checksums), or the checkpoint at ``path``."""
    from fluxopt.serving import load_model

    pipe = load_model("flux-mini", device=device, dtype=str(dtype).removeprefix("torch."),
                      path=str(path) if path else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], steps: int = STEPS, guidance: float = GUIDANCE,
             size: int = dataset.RESOLUTION, batch: int = 16, callback=None):
    """Images (N, H, W, 3) float in [0, 1] and final packed latents, one CPU generator per seed."""
    images, latents = [], []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for s in ss]
        final = {}

        def on_end(p, step, t, kw):
            if callback is not None:
                callback(step)
            final["latents"] = kw["latents"]
            return {}

        with torch.inference_mode():
            out = pipe(prompt=ps, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                       max_sequence_length=MAX_SEQUENCE_LENGTH, generator=gens, output_type="np",
                       callback_on_step_end=on_end, callback_on_step_end_tensor_inputs=["latents"])
        images.append(np.asarray(out.images, dtype=np.float32))
        latents.append(final["latents"].float().cpu())
    return np.concatenate(images), torch.cat(latents)


def eval_prompts(split: str, n: int, seed: int) -> tuple[list[str], list[dataset.Attributes]]:
    combos = {"held_out": dataset.held_out_combinations, "train": dataset.train_combinations}[split]()
    rng = np.random.default_rng(seed)
    attrs = [combos[i] for i in rng.permutation(len(combos))[:n]] if n <= len(combos) else \
        [combos[i] for i in rng.integers(0, len(combos), n)]
    templates = rng.integers(0, len(dataset.TEMPLATES), n)
    return [a.caption(int(t)) for a, t in zip(attrs, templates)], attrs


def accuracy(pipe, split: str, n: int, seed: int = 1234, steps: int = STEPS, batch: int = 16) -> dict:
    prompts, attrs = eval_prompts(split, n, seed)
    images, _ = generate(pipe, prompts, [seed + i for i in range(n)], steps=steps, batch=batch)
    hits = {k: 0 for k in dataset.CHANCE}
    all_ok = 0
    rows = []
    for img, a, p in zip(images, attrs, prompts):
        d = dataset.detect(img)
        s = dataset.score(d, a)
        all_ok += all(s.values())
        for k, v in s.items():
            hits[k] += v
        rows.append({"prompt": p, "detected": {k: d[k] for k in a.as_dict()}, "correct": s})
    chance_all = float(np.prod(list(dataset.CHANCE.values())))
    return {"split": split, "n": n, "steps": steps, "guidance_scale": GUIDANCE,
            "accuracy": {k: v / n for k, v in hits.items()}, "chance": dict(dataset.CHANCE),
            "all_attributes_correct": all_ok / n, "all_attributes_chance": chance_all,
            "samples": rows, "_images": images}


def detector_on_renders(n: int = 1000, seed: int = 99) -> dict:
    batch = dataset.make_batch(seed, n, "all")
    imgs = dataset.to_uint8(batch.images)
    hits = {k: 0 for k in dataset.CHANCE}
    for img, a in zip(imgs, batch.attributes):
        for k, v in dataset.score(dataset.detect(img), a).items():
            hits[k] += v
    return {"n": n, "accuracy": {k: v / n for k, v in hits.items()}}


def first_block_residuals(pipe, prompts: list[str], seeds: list[int], steps: int = STEPS) -> dict:
    """Per step, ``mean|r_t - r_{t-1}| / mean|r_{t-1}|`` of the first double block's image-stream
    residual (output minus input): the quantity FirstBlockCacheConfig thresholds."""
    block = pipe.transformer.transformer_blocks[0]
    residuals: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        out = output[1] if isinstance(output, tuple) else output  # (encoder_hidden_states, hidden_states)
        residuals.append((out - hidden).float().cpu())

    handle = block.register_forward_hook(hook, with_kwargs=True)
    traces = []
    try:
        for p, s in zip(prompts, seeds):
            residuals.clear()
            generate(pipe, [p], [s], steps=steps, batch=1)
            diffs = [float((b - a).abs().mean() / a.abs().mean()) for a, b in zip(residuals, residuals[1:])]
            traces.append(diffs)
    finally:
        handle.remove()
    arr = np.array(traces)
    return {"steps": steps, "prompts": prompts, "per_prompt": traces,
            "mean_per_step": arr.mean(0).tolist(), "median_over_steps": float(np.median(arr)),
            "fraction_below": {str(t): float((arr < t).mean()) for t in THRESHOLDS}}


def fbcache(pipe, prompts: list[str], seeds: list[int], thresholds=THRESHOLDS, steps: int = STEPS) -> dict:
    """Skipped steps and fidelity of diffusers' first-block cache against the uncached run."""
    from diffusers.hooks import FirstBlockCacheConfig
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    tail = pipe.transformer.single_transformer_blocks[-1].attn  # runs only when the tail is computed
    calls = {"n": 0}
    handle = tail.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        t0 = time.perf_counter()
        ref_imgs, ref_lat = generate(pipe, prompts, seeds, steps=steps, batch=1)
        base_s = time.perf_counter() - t0
        base_calls = calls["n"]
        results = []
        for th in thresholds:
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=th))
            try:
                calls["n"] = 0
                t0 = time.perf_counter()
                imgs, lat = generate(pipe, prompts, seeds, steps=steps, batch=1)
                secs = time.perf_counter() - t0
            finally:
                pipe.transformer.disable_cache()
            computed = calls["n"] / len(prompts)
            psnr = [float(peak_signal_noise_ratio(a, b, data_range=1.0)) if not np.array_equal(a, b) else 100.0
                    for a, b in zip(ref_imgs, imgs)]
            ssim = [float(structural_similarity(a, b, channel_axis=2, data_range=1.0)) for a, b in zip(ref_imgs, imgs)]
            rel = [float(torch.linalg.vector_norm(b.double() - a.double()) / torch.linalg.vector_norm(a.double()))
                   for a, b in zip(ref_lat, lat)]
            results.append({"threshold": th, "steps_computed_mean": computed, "steps_skipped_mean": steps - computed,
                            "psnr_mean": float(np.mean(psnr)), "psnr_min": float(np.min(psnr)),
                            "ssim_mean": float(np.mean(ssim)), "ssim_min": float(np.min(ssim)),
                            "latent_rel_l2_mean": float(np.mean(rel)), "latent_rel_l2_max": float(np.max(rel)),
                            "seconds": secs, "uncached_seconds": base_s})
    finally:
        handle.remove()
    return {"steps": steps, "prompts": prompts, "seeds": seeds, "uncached_tail_calls_per_image": base_calls / len(prompts),
            "thresholds": results}


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    grid = np.ones((rows * (h + 2), columns * (w + 2), 3), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="pipeline directory (default: the shipped weights)")
    ap.add_argument("--out", type=Path, required=True, help="directory for flux-mini-*.json")
    ap.add_argument("--images", type=Path, help="directory for sample grids (PNG)")
    ap.add_argument("--n", type=int, default=114, help="captions per split for accuracy (114 = every held-out combination once)")
    ap.add_argument("--cache-prompts", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--only", choices=("accuracy", "cache"), help="run one part only")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = load(args.weights, args.device, getattr(torch, args.dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m fluxopt.zoo.flux_mini.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
            "python": platform.python_version(), "weights": args.weights or "shipped (fluxopt_plugins/flux_mini/weights)"}
    if args.only in (None, "accuracy"):
        result = {**meta, "detector_on_ground_truth_renders": detector_on_renders(), "splits": {}}
        for split in ("held_out", "train"):
            t0 = time.perf_counter()
            acc = accuracy(pipe, split, args.n)
            images = acc.pop("_images")
            acc["seconds"] = time.perf_counter() - t0
            result["splits"][split] = acc
            print(split, json.dumps(acc["accuracy"]), "all:", acc["all_attributes_correct"], flush=True)
            if args.images:
                args.images.mkdir(parents=True, exist_ok=True)
                save_grid(images[:32], args.images / f"flux-mini-{split}.png")
                (args.images / f"flux-mini-{split}.txt").write_text(
                    "\n".join(f"{i}: {r['prompt']}" for i, r in enumerate(acc["samples"][:32])) + "\n")
        (args.out / "flux-mini-accuracy.json").write_text(json.dumps(result, indent=2))
    if args.only in (None, "cache"):
        prompts, _ = eval_prompts("held_out", args.cache_prompts, 777)
        seeds = [100 + i for i in range(len(prompts))]
        result = {**meta, "residuals": first_block_residuals(pipe, prompts, seeds),
                  "first_block_cache": fbcache(pipe, prompts, seeds)}
        for row in result["first_block_cache"]["thresholds"]:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        print("median residual change", result["residuals"]["median_over_steps"], flush=True)
        (args.out / "flux-mini-cache.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
