"""The PickStyle sampler: a ``WanVACEPipeline`` with its own denoising loop (CFG, CS-CFG, APG, skip, cache).

diffusers' callbacks run after the scheduler step and cannot change how the predictions are combined, so
the loop is re-written here (docs/method.md §3); everything else (prompt encoding, VACE context encoding,
masks, noise) reuses the parent's helpers unchanged. The source video enters the VACE context with
mask = ones: "reactive" = VAE(video), "inactive" = VAE(zeros), plus the 64-channel mask (96 channels).

Guidance modes (``guidance=``), with ε_c = ε(x; text, C), ε_t = ε(x; ∅, C), ε_0 = ε(x; ∅, π(C)):
  * ``none``        ε_c                                   (1 prediction)
  * ``cfg``         ε_t + t_g(ε_c − ε_t)                  (2; the stock WanVACEPipeline behaviour)
  * ``cfg_joint``   ε_0 + t_g(ε_c − ε_0)                  (2; text and context dropped together)
  * ``cs_cfg``      ε_t + t_g(ε_c − ε_t) + c_g(ε_t − ε_0) (3; PickStyle Eq. 16)
  * ``cs_cfg_apg``  ε_c + (t_g−1)APG(ε_c−ε_t) + (c_g−1)APG(ε_t−ε_0)   (3; the public code's default)

Fast CS-CFG (``guidance_every=k``): all the predictions every k-th step only; in between ε_c alone (or ε_c and
ε_t, ``guidance_reuse="context"``) and the last full step's guidance directions (``reuse_guidance``). With
k = 2 CS-CFG runs 2 predictions per step on average, CFG's price (bench/RESULTS.md, "sample").

Long videos (``window_frames=``): the whole video is VAE-encoded once and denoised as one latent; every step
runs the guidance on each window of ``window_frames`` frames (overlapping by >= ``window_overlap``) and
averages the windows' noise predictions with tent weights before one scheduler step on the whole latent
(MultiDiffusion, https://arxiv.org/abs/2302.08113; FreeNoise, https://arxiv.org/abs/2310.15169). One noise
draw, one decode: no pixel cross-fade, no seam. Wan's VAE is causal in time, so with a 4x temporal VAE a
window that starts mid-video sees a first latent frame that stands for 4 frames, not 1 as in training.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    WanVACEPipeline,
)
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from pickstyle.config import GUIDANCE_MODES, WAN_NEGATIVE_PROMPT
from pickstyle.model import latent_space
from pickstyle.model.cache import StepCache, step_cache
from pickstyle.model.components import prompt_length
from pickstyle.model.guidance import permute_context
from pickstyle.model.guiders import make_guider
from pickstyle.model.schedulers import make_scheduler, scheduler_name
from pickstyle.model.windows import plan_windows, window_weights


def _as_pil_list(video: Any) -> list[PIL.Image.Image]:
    """uint8 ``[T, H, W, 3]`` arrays become PIL frames, which the parent's video processor reads as [0, 255]."""
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise ValueError(f"video array must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
        return [PIL.Image.fromarray(f) for f in video]
    # A list of uint8 frames too: the parent's processor would read raw arrays as floats in [0, 1].
    return [PIL.Image.fromarray(f) if isinstance(f, np.ndarray) and f.dtype == np.uint8 else f for f in video]


def _frame_size(frame: Any) -> tuple[int, int]:
    if isinstance(frame, PIL.Image.Image):
        return frame.height, frame.width
    arr = np.asarray(frame)
    return int(arr.shape[0]), int(arr.shape[1])


class PickStylePipeline(WanVACEPipeline):
    """Video-to-video style transfer with Context-Style CFG on Wan2.1-VACE (PickStyle, arXiv 2510.07546)."""

    @torch.no_grad()
    def __call__(
        self,
        video: Any,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        *,
        height: int,
        width: int,
        num_frames: int | None = None,
        num_inference_steps: int = 20,
        guidance: str = "cs_cfg",
        t_guide: float = 5.0,
        c_guide: float = 4.0,
        skip: int = 0,
        batched: bool = True,
        scheduler: str | None = None,
        shift: float | None = None,
        cache_threshold: float | None = None,
        cache_warmup: int = 1,
        guidance_every: int = 1,
        guidance_reuse: str = "all",
        conditioning_scale: float | list[float] = 1.0,
        apg_momentum: float = 0.75,
        apg_norm_threshold: float = 55.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        max_sequence_length: int | None = None,
        window_frames: int | None = None,
        window_overlap: int = 4,
    ) -> WanPipelineOutput | tuple:
        """Re-render ``video`` following ``prompt``.

        Args:
            video: source frames: uint8 ``[T, H, W, 3]`` array or a list of PIL images, exactly
                ``height`` x ``width`` (a smaller video would silently get a zero-padded context).
            prompt: the style prompt (``"anime style. …"``); or pass ``prompt_embeds``.
            negative_prompt: the "∅ text"; ``None`` = Wan's default negative prompt, ``""`` allowed.
            height, width: the frame size, required so it is never guessed (multiples of 16).
            num_frames: frames to generate (default ``len(video)``; must be 4n+1 and equal ``len(video)``).
            num_inference_steps: N, the length of the sigma schedule.
            guidance: one of ``GUIDANCE_MODES`` (module docstring).
            t_guide, c_guide: text and context guidance scales.
            skip: k in [0, N): start from the source latent noised to sigma_k and run steps k…N−1.
            batched: run the predictions of one step as one forward (batch 2-3); False = one by one.
            scheduler: ``unipc``/``dpmpp``/``euler`` (``None`` = the pipeline's own scheduler).
            shift: sampling shift (``None`` = the scheduler's own).
            cache_threshold: step-cache threshold (``pickstyle.model.cache``, rescaled by the backbone's
                calibration when it has one); ``None`` = no cache installed.
            cache_warmup: first steps the step cache always computes (retention steps).
            guidance_every: k: compute all the guidance predictions every k-th step only (1 = every step);
                in between, the guidance directions of the last full step are reused (``reuse_guidance``).
            guidance_reuse: ``all`` (reuse steps compute ε_c only: text and context directions reused) or
                ``context`` (reuse steps compute ε_c and ε_t: only the context direction ε_t − ε_0 reused).
            conditioning_scale: VACE hint scale (per layer or one float).
            apg_momentum, apg_norm_threshold: APG settings of ``cs_cfg_apg``.
            generator: draws the initial noise and then, every step, the null-context permutation.
            latents: initial noise ``[1, z, f, h, w]`` (default: drawn from ``generator``).
            prompt_embeds, negative_prompt_embeds: precomputed text embeddings.
            output_type: ``np`` (float frames in [0, 1]), ``pil``, ``pt`` or ``latent``.
            return_dict: return a ``WanPipelineOutput`` (else a tuple).
            attention_kwargs: passed to the transformer (``{"scale": s}`` scales LoRA layers).
            max_sequence_length: text tokens (must match what training used; default
                :func:`~pickstyle.model.components.prompt_length`, as the latents stage pads to).
            window_frames: frames per denoising window (the model's clip length, 4n+1); ``None`` = one window.
                A longer video is denoised as one latent in overlapping windows of this many frames (in latent
                frames: ``(window_frames - 1) // t + 1`` for the VAE's temporal factor t) whose noise
                predictions are averaged with tent weights every step; each window gets the guidance, its own
                null-context permutation and its own step-cache state.
            window_overlap: frames that consecutive windows share at least (rounded up to latent frames).
        """
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance {guidance!r}: expected one of {GUIDANCE_MODES}")
        # one guider per video window (below); this one checks the settings before any work is done
        guider = make_guider(
            guidance,
            t_guide=t_guide,
            c_guide=c_guide,
            every=guidance_every,
            reuse=guidance_reuse,
            apg_momentum=apg_momentum,
            apg_norm_threshold=apg_norm_threshold,
        )
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError("one prompt (a str) per call")
        video = _as_pil_list(video)
        if not video:
            raise ValueError("video has no frames")
        num_frames = len(video) if num_frames is None else num_frames
        # Wan's 4n+1 frames (also when a small VAE compresses time less: clips stay interchangeable)
        if num_frames != len(video) or (num_frames - 1) % max(4, self.vae_scale_factor_temporal):
            raise ValueError(
                f"num_frames must equal len(video) and be 4n+1, got num_frames={num_frames}, len(video)={len(video)}"
            )
        if _frame_size(video[0]) != (height, width):
            raise ValueError(
                f"video frames are {_frame_size(video[0])}, expected (height, width) = {(height, width)}"
            )
        if window_frames is not None and (window_frames < 1 or window_overlap < 0):
            raise ValueError(
                f"need window_frames >= 1 and window_overlap >= 0, got {window_frames}, {window_overlap}"
            )
        if not 0 <= skip < num_inference_steps:
            raise ValueError(f"skip must be in [0, {num_inference_steps}), got {skip}")
        branches = guider.branches
        if negative_prompt is None and negative_prompt_embeds is None:
            negative_prompt = WAN_NEGATIVE_PROMPT
        self.check_inputs(
            prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds, None, video
        )

        self._guidance_scale = t_guide
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        device = self._execution_device
        transformer = self.transformer
        transformer_dtype = transformer.dtype

        vace_layers = transformer.config.vace_layers
        if isinstance(conditioning_scale, (int, float)):
            conditioning_scale = [conditioning_scale] * len(vace_layers)
        if len(conditioning_scale) != len(vace_layers):
            raise ValueError(
                f"conditioning_scale has {len(conditioning_scale)} entries, need {len(vace_layers)}"
            )
        conditioning_scale = torch.tensor(conditioning_scale).to(device=device, dtype=transformer_dtype)

        # 1. Text: the prompt and the "∅ text" (Wan's negative prompt by default).
        if max_sequence_length is None:
            max_sequence_length = prompt_length(self)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=len(branches) > 1,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        # 2. Sigmas/timesteps.
        if scheduler is None and shift is None:
            sched = self.scheduler
        else:
            name = scheduler or scheduler_name(self.scheduler)
            if shift is None:
                shift = self.scheduler.config.get("flow_shift", self.scheduler.config.get("shift", 1.0))
            sched = make_scheduler(name, shift, self.scheduler.config)
        sched.set_timesteps(num_inference_steps, device=device)
        timesteps = sched.timesteps[skip:]
        if skip:
            # Multistep solvers index their sigmas by step: start the count at k, not at 0.
            sched.set_begin_index(skip)

        # 3. VACE context [1, 96, f, h, w]: inactive = VAE(0), reactive = VAE(video), then the mask.
        video_t, mask, reference_images = self.preprocess_conditions(
            video, None, None, 1, height, width, num_frames, torch.float32, device
        )
        video_latents = self.prepare_video_latents(video_t, mask, reference_images, generator, device)
        mask = self.prepare_masks(mask, reference_images, generator)
        z_dim = self.vae.config.z_dim
        inactive, reactive = video_latents[:, :z_dim], video_latents[:, z_dim : 2 * z_dim]
        context = latent_space.vace_context(inactive, reactive, mask).to(transformer_dtype)
        source_latents = reactive.float()  # normalised VAE(video)

        # 4. Initial latents: pure noise, or (skip = k) the source latent noised to sigma_k.
        latents = self.prepare_latents(
            1,
            transformer.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )
        if skip:
            sigma = sched.sigmas[skip].to(device=device, dtype=torch.float32)
            latents = (1 - sigma) * source_latents + sigma * latents

        text_embeds = {"c": prompt_embeds, "t": negative_prompt_embeds, "0": negative_prompt_embeds}

        # 5. Windows of latent frames. One window (the default) is the whole video. A video longer than the
        # model's clip is still one latent (one VAE encode, one noise draw, one decode); every step denoises each
        # window and averages their noise predictions where they overlap (MultiDiffusion, FreeNoise).
        num_latent_frames = latents.shape[2]
        windows = [(0, num_latent_frames)]
        if window_frames is not None:
            t_scale = self.vae_scale_factor_temporal
            windows = plan_windows(
                num_latent_frames, (window_frames - 1) // t_scale + 1, math.ceil(window_overlap / t_scale)
            )
        # Each window has its own guider: its APG momentum and reused guidance directions are the window's.
        guiders = [guider.fresh() for _ in windows]

        def guided(
            x: torch.Tensor,
            ctx: torch.Tensor,
            t: torch.Tensor,
            step: int,
            window: int,
            cache: StepCache | None,
        ) -> torch.Tensor:
            """The guided noise prediction of one window at step ``t`` (``[1, z, f, h, w]``, float32)."""
            computed = guiders[window].computed(step)
            # A fresh null context every step, drawn from the pipeline's generator (reproducible).
            contexts = {"c": ctx, "t": ctx}
            if "0" in computed:
                contexts["0"] = permute_context(ctx, generator)
            eps = self._predict(
                x.to(transformer_dtype),
                t,
                computed,
                text_embeds,
                contexts,
                conditioning_scale,
                batched,
                cache,
                attention_kwargs,
                # the step cache keeps one state per window (its residuals are the window's)
                suffix="" if len(windows) == 1 else f"@{window}",
            )
            return guiders[window].guide(eps, step)

        # 6. Denoising loop.
        self._num_timesteps = len(timesteps)
        with contextlib.ExitStack() as stack:
            cache: StepCache | None = None
            if cache_threshold is not None:
                cache = stack.enter_context(
                    step_cache(transformer, cache_threshold, warmup=cache_warmup, num_steps=len(timesteps))
                )
            progress_bar = stack.enter_context(self.progress_bar(total=len(timesteps)))
            for step, t in enumerate(timesteps):
                self._current_timestep = t
                if len(windows) == 1:
                    noise_pred = guided(latents, context, t, step, 0, cache)
                else:
                    noise_pred = torch.zeros_like(latents)  # [1, z, f, h, w]
                    weight = latents.new_zeros(num_latent_frames)
                    for i, (start, end) in enumerate(windows):
                        tent = window_weights(end - start).to(latents)
                        pred = guided(latents[:, :, start:end], context[:, :, start:end], t, step, i, cache)
                        noise_pred[:, :, start:end] += pred * tent.view(1, 1, -1, 1, 1)
                        weight[start:end] += tent
                    noise_pred = noise_pred / weight.view(1, 1, -1, 1, 1)
                latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
                progress_bar.update()
            self.cache_stats = cache.stats() if cache is not None else {}
            # (input change, residual change) pairs of consecutive computed steps: the cache's calibration data
            self.cache_pairs = [p for state in cache.states.values() for p in state.pairs] if cache else []
        self._current_timestep = None

        # 7. Decode (the whole latent at once).
        if output_type == "latent":
            out = latents
        else:
            z = latent_space.denormalise(self.vae, latents)
            out = latent_space.vae_decode(self.vae, z)
            out = self.video_processor.postprocess_video(out, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out,)
        return WanPipelineOutput(frames=out)

    def prepare_video_latents(
        self,
        video: torch.Tensor,
        mask: torch.Tensor,
        reference_images: list[list[torch.Tensor]] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """``[inactive, reactive]`` latents of the context, as diffusers' ``WanVACEPipeline`` makes them; a
        frame-wise VAE (:func:`~pickstyle.model.latent_space.framewise`) encodes each frame on its own."""
        has_refs = any(r is not None for batch in reference_images or [] for r in batch)
        if not latent_space.framewise(self.vae) or has_refs or mask is None:
            return super().prepare_video_latents(video, mask, reference_images, generator, device)
        mask = torch.where(mask > 0.5, 1.0, 0.0).to(video.dtype)
        inactive = latent_space.encode(self.vae, video * (1 - mask))
        reactive = latent_space.encode(self.vae, video * mask)
        return torch.cat([inactive, reactive], dim=1).to(self.vae.dtype)

    def _predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        branches: tuple[str, ...],
        text_embeds: dict[str, torch.Tensor],
        contexts: dict[str, torch.Tensor],
        conditioning_scale: torch.Tensor,
        batched: bool,
        cache: StepCache | None,
        attention_kwargs: dict[str, Any] | None,
        suffix: str = "",
    ) -> dict[str, torch.Tensor]:
        """The noise predictions of one step, one forward of batch ``len(branches)`` or one per branch."""
        if batched and len(branches) > 1:
            groups = [branches]
        else:
            groups = [(b,) for b in branches]
        eps: dict[str, torch.Tensor] = {}
        for group in groups:
            n = len(group)
            kwargs = {
                "hidden_states": latents.expand(n, *latents.shape[1:]) if n > 1 else latents,
                "timestep": t.expand(n),
                "encoder_hidden_states": torch.cat([text_embeds[b] for b in group])
                if n > 1
                else text_embeds[group[0]],
                "control_hidden_states": torch.cat([contexts[b] for b in group])
                if n > 1
                else contexts[group[0]],
                "control_hidden_states_scale": conditioning_scale,
                "attention_kwargs": attention_kwargs,
                "return_dict": False,
            }
            key = "+".join(group) + suffix
            if cache is not None:
                with cache.branch(key):
                    out = self.transformer(**kwargs)[0]
            else:
                with self.transformer.cache_context(key):
                    out = self.transformer(**kwargs)[0]
            for i, b in enumerate(group):
                eps[b] = out[i : i + 1].float()
        return eps
