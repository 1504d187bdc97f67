"""Tiny random diffusers pipelines of real architectures, built from config (nothing downloaded):
a Stable Diffusion inpainting pipeline and an InstructPix2Pix instruction editor, saved with
save_pretrained so that `--ig diffusers:FOLDER` loads them as it would any checkpoint.

    python tests/tiny_diffusers.py inpaint runs/tiny-inpaint
    python tests/tiny_diffusers.py instruct runs/tiny-instruct
"""
import sys

import torch


def build(kind, folder):
    """kind: inpaint (the UNet reads latents, mask and masked image: 9 channels) or instruct
    (latents and the image's latents: 8 channels). About 100k parameters; 32-64 px working size."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels={"inpaint": 9, "instruct": 8}[kind], out_channels=4,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16)
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    # a character-level CLIP vocabulary: enough to tokenize any prompt, no merges
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = {"inpaint": StableDiffusionInpaintPipeline, "instruct": StableDiffusionInstructPix2PixPipeline}[kind]
    pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
             safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("inpaint", "instruct"):
        sys.exit(__doc__)
    print(build(sys.argv[1], sys.argv[2]))
