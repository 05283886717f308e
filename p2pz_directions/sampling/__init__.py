"""``p2pz_directions.sampling``: the one sampling layer under every editor, public for plugin authors.

Small functions over diffusers' building blocks, named as the papers name things, all state passed
in and returned (k-diffusion's style):

============================  ==================================================================
conditioning                  `encode_prompt` (``StableDiffusionPipeline.encode_prompt``), `encode_text`
guidance                      `cfg` (+ `rescale_noise_cfg`), `do_cfg`, `guidance_scale_embedding` (LCM)
images and latents            `preprocess_images` / `postprocess_images`, `encode_image` (`retrieve_latents`: AutoencoderKL and
                              AutoencoderTiny), `decode_latents`, `randn`, `make_generator`,
                              `epsilon_from_output`, `vae_scale_factor`, `image_processor`
schedulers                    `copy_scheduler` (keeps every setting), `check_scheduler` (a clear
                              `UnsupportedSchedulerError`), `extra_step_kwargs`, `strength_timesteps`
                              (`custom_strength_timesteps`)
loops                         `denoise` (any diffusers scheduler), `invert` (``*InverseScheduler``),
                              `cfg_predictor`, `unet_forward`, `LoopState`
running the UNet              `UNetRunner` (eager | CUDA graphs | torch.compile, one loop)
pix2pix-zero                  `Regularizer`, `regularize_noise_pred`, `auto_corr_loss`, `kl_divergence`
                              (+ closed-form gradients), `AttentionMaps`, `attention_maps`,
                              `inversion_step` / `reference_step` / `cross_attention_guided_step` and
                              their predictors
============================  ==================================================================

A text-to-image sampler in six lines (docs/plugins.md has a whole editor)::

    pos, neg = encode_prompt(tokenizer, text_encoder, "a cat", device, do_classifier_free_guidance=True)
    scheduler.set_timesteps(30, device=device)
    x = randn((1, 4, 64, 64), generator, device, unet.dtype) * scheduler.init_noise_sigma
    x = denoise(cfg_predictor(unet, guidance_scale=7.5), x, scheduler,
                tensors={"prompt_embeds": torch.cat([neg, pos])},
                extra_step_kwargs=extra_step_kwargs(scheduler, generator, eta=0.0))
    image = decode_latents(vae, x, "pil")[0]
"""

from p2pz_directions.sampling import ledits  # noqa: F401 - LEDITS++ functions, as sampling.ledits
from p2pz_directions.sampling.guidance import cfg, do_cfg, guidance_scale_embedding, rescale_noise_cfg
from p2pz_directions.sampling.latents import (
    decode_latents,
    encode_image,
    epsilon_from_output,
    image_processor,
    make_generator,
    postprocess_images,
    preprocess_images,
    randn,
    retrieve_latents,
    vae_scale_factor,
)
from p2pz_directions.sampling.loop import (
    LoopState,
    Predictor,
    StepEndCallback,
    StepRequest,
    cfg_predictor,
    check_callback_inputs,
    denoise,
    denoise_steps,
    invert,
    unet_forward,
)
from p2pz_directions.sampling.pix2pix_zero import (
    AttentionMaps,
    FusedProjections,
    Regularizer,
    attention_maps,
    auto_corr_grad,
    auto_corr_loss,
    cross_attention_guidance,
    cross_attention_guided_step,
    draw_roll_shifts,
    guided_predictor,
    inversion_predictor,
    inversion_step,
    kl_divergence,
    kl_grad,
    lockstep_passes,
    paired_step,
    reference_predictor,
    reference_step,
    regularize_noise_pred,
)
from p2pz_directions.sampling.runner import RUNNER_MODES, UNetRunner
from p2pz_directions.sampling.schedulers import (
    UnsupportedSchedulerError,
    check_scheduler,
    copy_scheduler,
    custom_strength_timesteps,
    draws_random_numbers,
    extra_step_kwargs,
    is_inverse_scheduler,
    is_scheduler,
    scheduler_class,
    strength_timesteps,
)
from p2pz_directions.sampling.text import encode_prompt, encode_text

__all__ = [
    "RUNNER_MODES",
    "AttentionMaps",
    "FusedProjections",
    "LoopState",
    "Predictor",
    "Regularizer",
    "StepEndCallback",
    "StepRequest",
    "UNetRunner",
    "UnsupportedSchedulerError",
    "attention_maps",
    "auto_corr_grad",
    "auto_corr_loss",
    "cfg",
    "cfg_predictor",
    "check_callback_inputs",
    "check_scheduler",
    "copy_scheduler",
    "scheduler_class",
    "cross_attention_guidance",
    "cross_attention_guided_step",
    "custom_strength_timesteps",
    "decode_latents",
    "denoise",
    "denoise_steps",
    "do_cfg",
    "draw_roll_shifts",
    "draws_random_numbers",
    "encode_image",
    "encode_prompt",
    "encode_text",
    "epsilon_from_output",
    "extra_step_kwargs",
    "guidance_scale_embedding",
    "guided_predictor",
    "image_processor",
    "invert",
    "inversion_predictor",
    "inversion_step",
    "is_inverse_scheduler",
    "is_scheduler",
    "kl_divergence",
    "kl_grad",
    "lockstep_passes",
    "make_generator",
    "paired_step",
    "postprocess_images",
    "preprocess_images",
    "randn",
    "reference_predictor",
    "reference_step",
    "regularize_noise_pred",
    "rescale_noise_cfg",
    "retrieve_latents",
    "strength_timesteps",
    "unet_forward",
    "vae_scale_factor",
]
