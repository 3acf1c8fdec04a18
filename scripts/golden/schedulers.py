"""Golden trajectories of the diffusers noise schedulers, for ensueno's scheduler tests.

Run from the repository root:

    /root/venvs/ensueno/bin/python scripts/golden/schedulers.py

For each case (a scheduler class, a scheduler_config dict and a step count) it
records, from diffusers itself:

- `timesteps`, `sigmas` (where the scheduler has them), `alphas_cumprod`,
  `init_noise_sigma`;
- a text-to-image trajectory: the start sample is a seeded N(0, 1) draw times
  `init_noise_sigma`; step i uses a seeded random "model output" `model_output[i]`
  that does not depend on the sample (so the trajectory can be replayed without a
  model) and, for the stochastic schedulers, the noise `noise[i]`, which is fed
  to diffusers by replacing the scheduler module's `randn_tensor` (the recorded
  tensor is the very one diffusers adds); per step it keeps the scaled model
  input, `prev_sample` and `pred_original_sample` (DPM-Solver++: the converted
  model output, its x0 estimate);
- an image-to-image start: a fresh scheduler, `set_begin_index(b)`,
  `add_noise(original, img_noise, timesteps[b])`, then the steps b.. with the same
  per-step model outputs and noise (index i of the full schedule).

One safetensors file per case in crates/ensueno/tests/fixtures/schedulers/, plus
`cases.json` (configs, scalars, versions).
"""

import json
import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete
from safetensors.torch import save_file

OUT = os.path.join("crates", "ensueno", "tests", "fixtures", "schedulers")
SHAPE = (1, 4, 4, 4)

SD15 = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1 scheduler_config.json: no timestep_spacing key,
# so each scheduler uses its own default.
SD2V = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "trained_betas": None,
}
LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def small_trained_betas():
    # A 100-step schedule given explicitly (trained_betas), rounded so the JSON stays short.
    return [round(float(b), 6) for b in np.linspace(0.001, 0.05, 100)]


def with_(base, **kw):
    d = dict(base)
    d.update(kw)
    return d


# (name, class, config, steps, img2img begin_index)
CASES = [
    # --- DDIM ---
    ("ddim_sd15_10", DDIMScheduler, SD15, 10, 3),
    ("ddim_sd15_25", DDIMScheduler, SD15, 25, 10),
    ("ddim_sd2v_10", DDIMScheduler, SD2V, 10, 4),
    ("ddim_linear_clip_linspace_10", DDIMScheduler, with_(LINEAR, timestep_spacing="linspace"), 10, 2),
    ("ddim_linear_clip_linspace_25", DDIMScheduler, with_(LINEAR, timestep_spacing="linspace", clip_sample_range=2.0), 25, 5),
    ("ddim_cos_trailing_sample_10", DDIMScheduler, with_(COSINE, timestep_spacing="trailing", prediction_type="sample", clip_sample=False), 10, 3),
    ("ddim_zerosnr_trailing_v_10", DDIMScheduler, with_(SD2V, timestep_spacing="trailing", rescale_betas_zero_snr=True), 10, 2),
    ("ddim_trained_betas_7", DDIMScheduler, {"num_train_timesteps": 100, "trained_betas": small_trained_betas(), "clip_sample": False, "set_alpha_to_one": False}, 7, 2),
    # --- Euler ---
    ("euler_sd15_10", EulerDiscreteScheduler, SD15, 10, 3),
    ("euler_sd15_25", EulerDiscreteScheduler, SD15, 25, 8),
    ("euler_sd2v_10", EulerDiscreteScheduler, SD2V, 10, 4),
    ("euler_sd15_leading_10", EulerDiscreteScheduler, with_(SD15, timestep_spacing="leading"), 10, 3),
    ("euler_sd15_trailing_10", EulerDiscreteScheduler, with_(SD15, timestep_spacing="trailing"), 10, 3),
    ("euler_sd15_karras_10", EulerDiscreteScheduler, with_(SD15, use_karras_sigmas=True), 10, 3),
    ("euler_sd15_karras_25", EulerDiscreteScheduler, with_(SD15, use_karras_sigmas=True), 25, 6),
    ("euler_linear_leading_sigmamin_10", EulerDiscreteScheduler, with_(LINEAR, timestep_spacing="leading", final_sigmas_type="sigma_min"), 10, 2),
    ("euler_cos_sample_10", EulerDiscreteScheduler, with_(COSINE, prediction_type="sample"), 10, 3),
    ("euler_zerosnr_trailing_v_10", EulerDiscreteScheduler, with_(SD2V, timestep_spacing="trailing", rescale_betas_zero_snr=True), 10, 2),
    ("euler_loglinear_10", EulerDiscreteScheduler, with_(SD15, interpolation_type="log_linear"), 10, 3),
    # --- DPM-Solver multistep ---
    ("dpm_sd15_10", DPMSolverMultistepScheduler, SD15, 10, 3),
    ("dpm_sd15_25", DPMSolverMultistepScheduler, SD15, 25, 8),
    ("dpm_sd15_karras_10", DPMSolverMultistepScheduler, with_(SD15, use_karras_sigmas=True), 10, 3),
    ("dpm_sd15_karras_25", DPMSolverMultistepScheduler, with_(SD15, use_karras_sigmas=True), 25, 7),
    ("dpm_sd2v_10", DPMSolverMultistepScheduler, SD2V, 10, 4),
    ("dpm_sd2v_karras_20", DPMSolverMultistepScheduler, with_(SD2V, use_karras_sigmas=True), 20, 5),
    ("dpm_heun_leading_20", DPMSolverMultistepScheduler, with_(SD15, timestep_spacing="leading", solver_type="heun"), 20, 5),
    ("dpm_trailing_order1_10", DPMSolverMultistepScheduler, with_(SD15, timestep_spacing="trailing", solver_order=1), 10, 3),
    ("dpm_sigmamin_nolof_20", DPMSolverMultistepScheduler, with_(SD15, final_sigmas_type="sigma_min", lower_order_final=False), 20, 4),
    ("dpm_sigmamin_euler_final_10", DPMSolverMultistepScheduler, with_(SD15, final_sigmas_type="sigma_min", euler_at_final=True), 10, 2),
    ("dpm_dpmsolver_heun_sigmamin_16", DPMSolverMultistepScheduler, with_(LINEAR, algorithm_type="dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"), 16, 4),
    ("dpm_dpmsolver_midpoint_sigmamin_10", DPMSolverMultistepScheduler, with_(SD2V, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), 10, 3),
    ("dpm_cos_sample_12", DPMSolverMultistepScheduler, with_(COSINE, prediction_type="sample"), 12, 3),
    ("dpm_order3_linear_20", DPMSolverMultistepScheduler, with_(LINEAR, solver_order=3), 20, 5),
    ("dpm_zerosnr_trailing_v_10", DPMSolverMultistepScheduler, with_(SD2V, timestep_spacing="trailing", rescale_betas_zero_snr=True), 10, 3),
    # --- Euler ancestral ---
    ("euler_a_sd15_10", EulerAncestralDiscreteScheduler, SD15, 10, 3),
    ("euler_a_sd15_25", EulerAncestralDiscreteScheduler, SD15, 25, 8),
    ("euler_a_sd2v_leading_10", EulerAncestralDiscreteScheduler, with_(SD2V, timestep_spacing="leading"), 10, 3),
    ("euler_a_zerosnr_trailing_v_10", EulerAncestralDiscreteScheduler, with_(SD2V, timestep_spacing="trailing", rescale_betas_zero_snr=True), 10, 2),
    # --- DDPM ---
    ("ddpm_sd15_10", DDPMScheduler, SD15, 10, 3),
    ("ddpm_linear_clip_large_trailing_v_10", DDPMScheduler, with_(LINEAR, variance_type="fixed_large", timestep_spacing="trailing", prediction_type="v_prediction"), 10, 3),
    ("ddpm_cos_linspace_sample_12", DDPMScheduler, with_(COSINE, timestep_spacing="linspace", prediction_type="sample", clip_sample_range=1.5), 12, 4),
    ("ddpm_zerosnr_leading_v_10", DDPMScheduler, with_(SD2V, rescale_betas_zero_snr=True, clip_sample=False), 10, 3),
]

KINDS = {
    DDIMScheduler: "ddim",
    DDPMScheduler: "ddpm",
    EulerDiscreteScheduler: "euler",
    EulerAncestralDiscreteScheduler: "euler-a",
    DPMSolverMultistepScheduler: "dpm++2m",
}
STOCHASTIC = {DDPMScheduler, EulerAncestralDiscreteScheduler}


class NoiseFeed:
    """Replaces `randn_tensor` in a scheduler module: hands out the noise chosen
    for the current step and remembers that it was used."""

    def __init__(self):
        self.current = None
        self.used = False

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(self.current.shape), (shape, self.current.shape)
        self.used = True
        return self.current.clone().to(dtype=dtype or torch.float32)


FEED = NoiseFeed()
scheduling_ddpm.randn_tensor = FEED
scheduling_euler_ancestral_discrete.randn_tensor = FEED


def as_float(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def run_steps(sched, cls, start_index, sample, model_outputs, noises):
    scaled, prev, pred = [], [], []
    timesteps = sched.timesteps
    for i in range(start_index, len(timesteps)):
        t = timesteps[i]
        x_in = sched.scale_model_input(sample, t)
        scaled.append(x_in.clone())
        FEED.current = noises[i]
        FEED.used = False
        out = sched.step(model_outputs[i], t, sample)
        if cls in STOCHASTIC and cls is EulerAncestralDiscreteScheduler:
            assert FEED.used
        if cls is DDPMScheduler:
            assert FEED.used == (int(t) > 0)
        if cls is DPMSolverMultistepScheduler:
            # diffusers' DPM step returns no x0; its x0 estimate is the converted model output.
            p = sched.model_outputs[-1].clone() if sched.config.algorithm_type == "dpmsolver++" else None
        else:
            p = out.pred_original_sample.clone()
        sample = out.prev_sample
        prev.append(sample.clone())
        pred.append(p)
    stack = lambda xs: torch.stack(xs).to(torch.float32).contiguous()
    result = {"scaled_model_input": stack(scaled), "prev_sample": stack(prev)}
    if all(p is not None for p in pred):
        result["pred_original_sample"] = stack(pred)
    return result


def run_case(idx, name, cls, config, steps, begin):
    sched = cls.from_config(config)
    gen = torch.Generator().manual_seed(1000 + idx)
    sched.set_timesteps(steps)
    n = len(sched.timesteps)
    init_noise_sigma = as_float(sched.init_noise_sigma)
    start = torch.randn(SHAPE, generator=gen) * sched.init_noise_sigma
    model_outputs = [torch.randn(SHAPE, generator=gen) for _ in range(n)]
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(n)]
    original = torch.randn(SHAPE, generator=gen)
    img_noise = torch.randn(SHAPE, generator=gen)

    tensors = {
        "timesteps": sched.timesteps.to(torch.float64).contiguous(),
        "alphas_cumprod": sched.alphas_cumprod.to(torch.float32).contiguous(),
        "start_sample": start.contiguous(),
        "model_output": torch.stack(model_outputs).contiguous(),
        "original": original.contiguous(),
        "img_noise": img_noise.contiguous(),
    }
    if hasattr(sched, "sigmas") and cls is not DDIMScheduler and cls is not DDPMScheduler:
        tensors["sigmas"] = torch.as_tensor(sched.sigmas).to(torch.float32).contiguous()
    if cls in STOCHASTIC:
        tensors["noise"] = torch.stack(noises).contiguous()
    for k, v in run_steps(sched, cls, 0, start, model_outputs, noises).items():
        tensors[k] = v

    # Image-to-image: a fresh scheduler entered at `begin`, as diffusers' img2img pipelines do.
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):  # DDIM/DDPM have no step counter
        sched.set_begin_index(begin)
    t_begin = sched.timesteps[begin : begin + 1]
    noisy = sched.add_noise(original, img_noise, t_begin)
    tensors["img2img_noisy"] = noisy.contiguous()
    for k, v in run_steps(sched, cls, begin, noisy, model_outputs, noises).items():
        tensors["img2img_" + k] = v

    save_file(tensors, os.path.join(OUT, name + ".safetensors"))
    # JSON has no infinities (lambda_min_clipped = -inf): write those as strings.
    full_config = {
        k: (repr(v) if isinstance(v, float) and not np.isfinite(v) else v)
        for k, v in dict(sched.config).items()
        if not k.startswith("_")
    }
    return {
        "name": name,
        "class": cls.__name__,
        "kind": KINDS[cls],
        "config": config,
        "resolved_config": full_config,
        "num_inference_steps": steps,
        "begin_index": begin,
        "init_noise_sigma": init_noise_sigma,
        "stochastic": cls in STOCHASTIC,
        "file": name + ".safetensors",
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    index = []
    for idx, (name, cls, config, steps, begin) in enumerate(CASES):
        index.append(run_case(idx, name, cls, config, steps, begin))
        print(f"wrote {name}.safetensors ({cls.__name__}, {steps} steps, begin_index {begin})")
    meta = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "shape": list(SHAPE),
        "cases": index,
    }

    def default(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        raise TypeError(type(o))

    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1, default=default)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(index)} cases to {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
