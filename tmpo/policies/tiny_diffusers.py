"""Tiny random-weight FLUX.1 and SD3.5 pipelines built from configs, for tests and CPU smoke runs.

Same classes as the real checkpoints (``FluxTransformer2DModel``, ``SD3Transformer2DModel``,
``AutoencoderKL``, ``CLIPTextModel(WithProjection)``, ``T5EncoderModel``,
``FlowMatchEulerDiscreteScheduler``), only the sizes differ, so every code path of
:mod:`tmpo.policies.flux` / :mod:`tmpo.policies.sd3` (and of diffusers' LoRA loading) runs here.
Tokenizers are word-level ``PreTrainedTokenizerFast`` objects built in memory with the ``tokenizers``
library from the mini world's caption words (unknown words map to ``<unk>``): nothing is downloaded.

A spec (the ``tiny`` node of ``conf/model/{flux,sd35}_tiny.yaml``) holds the keyword arguments of
each component; :func:`build_tiny_components` instantiates them with a fixed seed, so the same spec
and seed always give bit-identical weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")

# Defaults: a component not named in the spec gets these sizes.
FLUX_TINY: dict[str, Any] = {
    "transformer": {
        "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],
    },
    "vae": {
        "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
        "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    },
    "clip": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 32},
    "t5": {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4},
    "scheduler": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "max_length": 16,
}

SD3_TINY: dict[str, Any] = {
    "transformer": {
        "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2, "attention_head_dim": 8,
        "num_attention_heads": 4, "joint_attention_dim": 64, "caption_projection_dim": 32, "pooled_projection_dim": 64,
        "pos_embed_max_size": 16, "qk_norm": "rms_norm", "dual_attention_layers": [0],
    },
    "vae": {
        "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
        "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    },
    "clip": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 32},
    "t5": {"d_model": 64, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4},
    "scheduler": {"shift": 3.0},
    "max_length": 16,
}


# Full-size FLUX.1-dev transformer and VAE (diffusers' defaults / the released configs) with one-layer
# text encoders of FLUX's widths: random weights at the real cost, for GPU benchmarks without weights.
FLUX_FULL: dict[str, Any] = {
    "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
                    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                    "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]},
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32,
            "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 1, "projection_dim": 768},
    "t5": {"d_model": 4096, "d_kv": 64, "d_ff": 1024, "num_layers": 1, "num_heads": 64},
    "max_length": 77,
}


def tiny_vocabulary() -> list[str]:
    """Special tokens, the mini world's caption words, single letters and digits (sign text), punctuation."""
    import string

    from tmpo.world.tokenizer import caption_words

    words = [w.lower() for w in caption_words()] + list(string.ascii_lowercase + string.digits)
    return list(dict.fromkeys([*SPECIAL_TOKENS, *words, '"', ",", "."]))


def word_level_tokenizer(max_length: int, vocab: Sequence[str] | None = None, add_bos: bool = True):
    """A lower-casing, whitespace/punctuation-splitting word-level ``PreTrainedTokenizerFast``.

    ``add_bos``: CLIP-style ``<bos> ... <eos>``; otherwise T5-style ``... <eos>``. ``<pad>`` pads.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(vocab) if vocab is not None else tiny_vocabulary()
    missing = [t for t in SPECIAL_TOKENS if t not in words]
    if missing:
        raise ValueError(f"tiny tokenizer vocabulary lacks the special tokens {missing}")
    index = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(index, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    single = "<bos> $A <eos>" if add_bos else "$A <eos>"
    specials = [(t, index[t]) for t in ("<bos>", "<eos>")]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=int(max_length), pad_token="<pad>", unk_token="<unk>",
        bos_token="<bos>", eos_token="<eos>",
    )


def _merged(defaults: Mapping[str, Any], spec: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in defaults.items()}
    for k, v in (spec or {}).items():
        if k not in out:
            raise ValueError(f"unknown tiny component {k!r}; valid: {sorted(out)}")
        out[k] = {**out[k], **dict(v)} if isinstance(out[k], dict) else v
    return out


def _clip(cfg: Mapping[str, Any], vocab_size: int, max_length: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3, **cfg
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(cfg: Mapping[str, Any], vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0, **cfg))


def _vae(cfg: Mapping[str, Any]):
    from diffusers import AutoencoderKL

    n = len(cfg["block_out_channels"])
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n, **cfg
    )


def build_tiny_components(family: str, spec: Mapping[str, Any] | None = None, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Random-weight pipeline components (the ``FluxPipeline`` / ``StableDiffusion3Pipeline`` kwargs).

    Args:
        family: ``"flux"`` or ``"sd3"``.
        spec: per-component overrides of :data:`FLUX_TINY` / :data:`SD3_TINY` (:data:`FLUX_FULL` for the real sizes).
        seed: the weights are a function of ``(family, spec, seed)`` only (on one device type).
        device: where the weights are created and initialised (``cuda`` for full-size models).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    if family not in ("flux", "sd3"):
        raise ValueError(f"unknown tiny family {family!r}; choose 'flux' or 'sd3'")
    cfg = _merged(FLUX_TINY if family == "flux" else SD3_TINY, spec)
    vocab = tiny_vocabulary()
    n_vocab, max_len = len(vocab), int(cfg["max_length"])
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        out: dict[str, Any] = {"vae": _vae(cfg["vae"]), "scheduler": FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])}
        if family == "flux":
            out["transformer"] = FluxTransformer2DModel(**cfg["transformer"])
            out["text_encoder"] = _clip(cfg["clip"], n_vocab, max_len, with_projection=False)
            out["text_encoder_2"] = _t5(cfg["t5"], n_vocab)
            out["tokenizer"] = word_level_tokenizer(max_len, vocab)
            out["tokenizer_2"] = word_level_tokenizer(max_len, vocab, add_bos=False)
        else:
            out["transformer"] = SD3Transformer2DModel(**cfg["transformer"])
            out["text_encoder"] = _clip(cfg["clip"], n_vocab, max_len, with_projection=True)
            out["text_encoder_2"] = _clip(cfg["clip"], n_vocab, max_len, with_projection=True)
            out["text_encoder_3"] = _t5(cfg["t5"], n_vocab)
            out["tokenizer"] = word_level_tokenizer(max_len, vocab)
            out["tokenizer_2"] = word_level_tokenizer(max_len, vocab)
            out["tokenizer_3"] = word_level_tokenizer(max_len, vocab, add_bos=False)
    for module in out.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return out


def build_tiny_pipeline(family: str, spec: Mapping[str, Any] | None = None, seed: int = 0):
    """A stock ``FluxPipeline`` / ``StableDiffusion3Pipeline`` over :func:`build_tiny_components`."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    return cls(**build_tiny_components(family, spec, seed))
