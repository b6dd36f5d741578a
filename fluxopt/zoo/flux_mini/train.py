"""Train ``flux-mini`` from scratch (or resume it) on the procedural shapes dataset.

Stage 1, VAE: AutoencoderKL trained as an autoencoder (L1 + MSE + a small KL term) on freshly
rendered batches; then FLUX's latent normalisation is measured on 4096 renders (``calib_images``) and stored in
the VAE config (``shift_factor`` = latent mean, ``scaling_factor`` = 1 / latent std), which is
what FluxPipeline uses to decode: ``x = vae.decode(z / scaling_factor + shift_factor)``.

Stage 2, transformer + text encoders: rectified flow as FLUX. A latent cache of the train split
is encoded once with the frozen VAE; each step takes ``x0 = (z - shift) * scale`` (a posterior
sample), packs it into 2x2 patches (``FluxPipeline._pack_latents``), draws ``t`` logit-normal and
noise ``e``, forms ``x_t = (1 - t) x0 + t e`` and regresses the transformer's output on the
velocity ``e - x0``, with the timestep passed as ``t`` (the pipeline passes ``sigma``), a
guidance value drawn uniformly from ``[1, 5]`` (guidance embedding, like FLUX.1-dev), CLIP's
pooled vector and T5's sequence computed with gradients (text encoders train jointly). An EMA
of the weights is what is saved.

Each stage runs for a number of steps; when a time budget is given instead, the first steps
are timed and the step count is fixed from them (and written to ``train_config.json``), so the
learning-rate schedule always completes. Rerun with ``--vae-steps/--dit-steps`` from that file
to repeat a run (GPU kernels are not bit-deterministic; the data stream is).

    python -m fluxopt.zoo.flux_mini.train --out runs/flux-mini --vae-seconds 120 --dit-seconds 330
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fluxopt.zoo.flux_mini import dataset
from fluxopt.zoo.flux_mini.model import MAX_SEQUENCE_LENGTH, build_untrained_pipeline, encode, tokenize

DEFAULTS = dict(
    seed=0,
    vae_batch=64, vae_lr=5e-4, vae_kl=1e-6, vae_warmup=100,
    cache_images=65536, calib_images=4096,
    dit_batch=256, dit_lr=5e-4, text_lr=2e-4, dit_warmup=300, ema=0.999, weight_decay=0.0,
    guidance_min=1.0, guidance_max=5.0, logit_mean=0.0, logit_std=1.0,
    final_lr_fraction=0.1,
    amp=True, dit_amp=True,  # bf16 autocast (CUDA only)
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, warmup: int, final_fraction: float) -> float:
    """Linear warm-up, then cosine decay to ``final_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


class StepPlanner:
    """Fixed step count, or one derived from a time budget after timing ``probe`` steps."""

    def __init__(self, steps: int | None, seconds: float | None, probe: int = 30):
        self.steps, self.seconds, self.probe = steps, seconds, probe
        self.start = None
        self.total = steps if steps is not None else 10**9

    def after_step(self, step: int, sync) -> None:
        if self.steps is not None:
            return
        if step == 4:  # skip the first steps (allocation, autotuning)
            sync()
            self.start = time.perf_counter()
        elif step == 4 + self.probe:
            sync()
            per_step = (time.perf_counter() - self.start) / self.probe
            self.total = max(step + 1, int(self.seconds / per_step))
            log(f"  {per_step * 1000:.1f} ms/step -> {self.total} steps in {self.seconds:.0f} s")


def train_vae(pipe, cfg: dict, device: torch.device, steps: int | None, seconds: float | None,
              history: list[dict]) -> int:
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["vae_lr"], betas=(0.9, 0.99), weight_decay=0.0)
    planner = StepPlanner(steps, seconds)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    step, t0 = 0, time.perf_counter()
    while step < planner.total:
        batch = dataset.make_batch(cfg["seed"] * 10**7 + step, cfg["vae_batch"], "all", device)
        x = batch.images
        for group in opt.param_groups:
            group["lr"] = cfg["vae_lr"] * lr_at(step, planner.total, cfg["vae_warmup"], cfg["final_lr_fraction"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"]):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample
        rec = rec.float()
        l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + mse + cfg["vae_kl"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        planner.after_step(step, sync)
        if step % 50 == 0 or step == planner.total - 1:
            row = dict(stage="vae", step=step, loss=loss.item(), l1=l1.item(), mse=mse.item(), kl=kl.item(),
                       lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
            history.append(row)
            if step % 250 == 0 or step == planner.total - 1:
                log(f"vae {step}/{planner.total} loss {row['loss']:.4f} l1 {row['l1']:.4f} kl {row['kl']:.1f}")
        step += 1
    vae.eval().requires_grad_(False)
    return step


@torch.no_grad()
def calibrate_latents(pipe, cfg: dict, device: torch.device) -> tuple[float, float]:
    """Mean and std of posterior means over ``calib_images`` renders -> (shift_factor, scaling_factor)."""
    zs = []
    for i in range(0, cfg["calib_images"], 512):
        batch = dataset.make_batch(cfg["seed"] * 10**7 + 9_000_000 + i // 512, min(512, cfg["calib_images"] - i),
                                   "all", device)
        zs.append(pipe.vae.encode(batch.images).latent_dist.mean.float())
    z = torch.cat(zs)
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(f"latent shift_factor {shift:.4f} scaling_factor {scale:.4f}")
    return shift, scale


@torch.no_grad()
def build_latent_cache(pipe, cfg: dict, device: torch.device, n: int):
    """Posterior (mean, std) of ``n`` train-split renders, plus their token ids."""
    means, stds, clip_ids, t5_ids = [], [], [], []
    chunk = 512
    for i in range(0, n, chunk):
        batch = dataset.make_batch(cfg["seed"] * 10**7 + 5_000_000 + i // chunk, min(chunk, n - i), "train", device)
        dist = pipe.vae.encode(batch.images).latent_dist
        means.append(dist.mean.to(torch.bfloat16))
        stds.append(dist.std.to(torch.bfloat16))
        c, t = tokenize(pipe, batch.captions)
        clip_ids.append(c)
        t5_ids.append(t)
    return (torch.cat(means), torch.cat(stds), torch.cat(clip_ids).to(device), torch.cat(t5_ids).to(device))


def train_dit(pipe, cfg: dict, device: torch.device, steps: int | None, seconds: float | None,
              history: list[dict]) -> int:
    from diffusers import FluxPipeline

    t0 = time.perf_counter()
    mean, std, clip_ids, t5_ids = build_latent_cache(pipe, cfg, device, cfg["cache_images"])
    log(f"latent cache: {mean.shape[0]} images in {time.perf_counter() - t0:.1f} s")
    if seconds is not None:
        seconds = max(10.0, seconds - (time.perf_counter() - t0))
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    n, c, h, w = mean.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(None, h // 2, w // 2, device, torch.float32)
    txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3, device=device)

    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW([
        {"params": list(pipe.transformer.parameters()), "base_lr": cfg["dit_lr"]},
        {"params": list(pipe.text_encoder.parameters()) + list(pipe.text_encoder_2.parameters()),
         "base_lr": cfg["text_lr"]},
    ], lr=cfg["dit_lr"], betas=(0.9, 0.99), weight_decay=cfg["weight_decay"])
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    planner = StepPlanner(steps, seconds)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1)
    step, t0 = 0, time.perf_counter()
    loss_sum, loss_count = torch.zeros((), device=device), 0  # mean loss since the last log line
    bsz = min(cfg["dit_batch"], n)
    while step < planner.total:
        idx = torch.randint(0, n, (bsz,), device=device, generator=gen)
        eps_z = torch.randn(bsz, c, h, w, device=device, generator=gen)
        z = mean[idx].float() + std[idx].float() * eps_z
        x0 = FluxPipeline._pack_latents((z - shift) * scale, bsz, c, h, w)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.sigmoid(cfg["logit_mean"] + cfg["logit_std"] * torch.randn(bsz, device=device, generator=gen))
        xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        guidance = cfg["guidance_min"] + (cfg["guidance_max"] - cfg["guidance_min"]) * torch.rand(
            bsz, device=device, generator=gen)
        frac = lr_at(step, planner.total, cfg["dit_warmup"], cfg["final_lr_fraction"])
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * frac
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"] and cfg["dit_amp"]):
            embeds, pooled = encode(pipe, clip_ids[idx], t5_ids[idx])
            pred = pipe.transformer(hidden_states=xt, timestep=t, guidance=guidance, pooled_projections=pooled,
                                    encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                                    return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        loss_sum += loss.detach()
        loss_count += 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], 1.0)
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in zip(modules, ema):
                torch._foreach_lerp_(list(e.parameters()), list(m.parameters()), 1 - decay)
        planner.after_step(step, sync)
        if step % 50 == 0 or step == planner.total - 1:
            value, avg = loss.item(), loss_sum.item() / loss_count
            loss_sum.zero_()
            loss_count = 0
            history.append(dict(stage="dit", step=step, loss=value, loss_mean=avg, grad_norm=grad.item(),
                                lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0))
            if step % 500 == 0 or step == planner.total - 1:
                log(f"dit {step}/{planner.total} loss {value:.4f} (mean of last steps {avg:.4f}) "
                    f"grad {grad.item():.2f}")
        step += 1
    for m, e in zip(modules, ema):
        m.load_state_dict(e.state_dict())
        m.eval().requires_grad_(False)
    return step


def write_history(history: list[dict], out: Path) -> None:
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "stage", k != "step", k))
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def plot_history(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, stage, key, title in ((axes[0], "vae", "loss", "VAE: L1 + MSE + KL"),
                                  (axes[1], "dit", "loss", "transformer: flow-matching MSE")):
        part = [r for r in rows if r["stage"] == stage]
        if not part:
            continue
        offset, steps, values = 0, [], []
        for r in part:  # resumed runs restart their step counter: plot cumulatively
            s = int(r["step"]) + offset
            if steps and s < steps[-1]:
                offset = steps[-1] + 1
                s = int(r["step"]) + offset
            steps.append(s)
            values.append(float(r[key]))
        ax.plot(steps, values, lw=0.8, label="one batch")
        if stage == "dit" and all(r.get("loss_mean") for r in part):
            ax.plot(steps, [float(r["loss_mean"]) for r in part], lw=1.5, label="mean since last point")
            ax.legend()
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output directory (pipeline in OUT/pipeline)")
    ap.add_argument("--resume", type=Path, help="a saved flux-mini pipeline directory: keep its VAE, "
                                                 "continue training transformer and text encoders")
    ap.add_argument("--config", type=Path, help="JSON file overriding DEFAULTS")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--vae-steps", type=int)
    ap.add_argument("--vae-seconds", type=float)
    ap.add_argument("--dit-steps", type=int)
    ap.add_argument("--dit-seconds", type=float)
    ap.add_argument("--deadline-seconds", type=float, help="cap on the whole run: the transformer stage "
                    "gets what is left minus --reserve-seconds")
    ap.add_argument("--reserve-seconds", type=float, default=45.0)
    ap.add_argument("--cache-images", type=int)
    ap.add_argument("--calib-images", type=int)
    ap.add_argument("--dit-batch", type=int)
    ap.add_argument("--vae-batch", type=int)
    ap.add_argument("--vae-only", action="store_true", help="stop after the VAE stage (resume later)")
    ap.add_argument("--no-dit-amp", action="store_true", help="transformer stage in float32 (TF32 matmuls)")
    ap.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on CPU too (testing)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    cfg = dict(DEFAULTS)
    if args.config:
        cfg.update(json.loads(args.config.read_text()))
    for key in ("seed", "cache_images", "calib_images", "dit_batch", "vae_batch"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = torch.device(args.device)
    cfg["amp"] = bool(cfg["amp"]) and (device.type == "cuda" or args.cpu_amp)
    if args.no_dit_amp:
        cfg["dit_amp"] = False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)  # flash / memory-efficient attention kernels only
    args.out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    if args.resume:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(args.resume), dtype=torch.float32)
        previous = json.loads((args.resume / "train_config.json").read_text()) if (
            args.resume / "train_config.json").exists() else {}
        old_csv = args.resume / "loss.csv"
        if old_csv.exists():
            history = [dict(r) for r in csv.DictReader(open(old_csv))]
        # a resumed stage draws a different data stream
        cfg["seed"] = cfg["seed"] + 1000 * (1 + len(previous.get("runs", [])))
    else:
        previous = {}
        pipe = build_untrained_pipeline(cfg["seed"])
    pipe.to(device)
    torch.manual_seed(cfg["seed"])
    run = {"config": cfg, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "resumed_from": str(args.resume) if args.resume else None}

    if not args.resume:
        t0 = time.perf_counter()
        run["vae_steps"] = train_vae(pipe, cfg, device, args.vae_steps, args.vae_seconds, history)
        run["vae_seconds"] = time.perf_counter() - t0
        run["latent_shift"], run["latent_scale"] = calibrate_latents(pipe, cfg, device)
    dit_seconds = args.dit_seconds
    if args.vae_only:
        args.dit_steps, dit_seconds = 0, None
    if args.deadline_seconds is not None and args.dit_steps is None:
        left = args.deadline_seconds - (time.perf_counter() - start) - args.reserve_seconds
        dit_seconds = left if dit_seconds is None else min(dit_seconds, left)
    t0 = time.perf_counter()
    run["dit_steps"] = 0 if args.vae_only else train_dit(pipe, cfg, device, args.dit_steps, dit_seconds, history)
    run["dit_seconds"] = time.perf_counter() - t0
    run["final_dit_loss_mean"] = next((r["loss_mean"] for r in reversed(history) if r["stage"] == "dit"), None)

    target = args.out / "pipeline"
    pipe.to("cpu")
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.to(torch.bfloat16)  # shipped like FLUX.1: bf16 safetensors
    pipe.save_pretrained(str(target), safe_serialization=True)
    write_history(history, target)
    record = {"runs": previous.get("runs", []) + [run]}
    (target / "train_config.json").write_text(json.dumps(record, indent=2))
    try:
        plot_history(target / "loss.csv", args.out / "loss.png")
    except Exception as exc:  # plotting is a convenience
        log(f"plot failed: {exc}")
    log(f"saved {target} after {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
