"""The Würstchen model stages, single-device and pure PyTorch (docs/design.md, "The Würstchen v2 model").

- stage_a: the f4 VQGAN (images <-> Stage B latents)
- semantic: the EfficientNetV2-S semantic compressor (images -> Stage C latents)
- stage_c: the text-conditional prior over semantic latents
- stage_b: the decoder from semantic latents to Stage A latents
- text: the CLIP text encoders and tokenizer
- diffusion: noise schedule, loss, caption dropout, sampler
- generate: prompts -> images through the whole chain
- weights: loading and saving weights (safetensors, or torch.load(weights_only=True))

Each model module holds a config dataclass and a registry of sizes ("tiny", "v2").
"""
