"""Export a run's LoRA in diffusers' format: ``python -m tmpo.export <run-dir> --out <dir>``.

The result loads into a stock pipeline with ``pipe.load_lora_weights(<dir>)`` (FLUX.1-dev:
``FluxPipeline``; SD3.5: ``StableDiffusion3Pipeline``) and reproduces the policy's velocity.

What it does: reads ``<run-dir>/config.yaml`` (model class and LoRA settings) and the run's atomic
checkpoint, takes the EMA weights (``--weights ema``, the ones the paper evaluates; ``policy`` for the
raw last iterate), renames peft's keys ``base_model.model.<module>.lora_A.default.weight`` to
``<module>.lora_A.weight`` (what ``peft.get_peft_model_state_dict`` gives, without the wrapper prefix)
and writes them with the pipeline's ``save_lora_weights`` together with the adapter's ``LoraConfig``
as safetensors metadata -- without it diffusers would assume alpha = r and halve the adapter.
No base weights are loaded. ``export.json`` beside the weights records the source run and step.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from tmpo.checkpoint import load_checkpoint, write_json_atomic

WEIGHTS = ("ema", "policy")
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.default\.weight$")


def diffusers_lora_keys(state: dict[str, Any]) -> dict[str, Any]:
    """peft training names -> diffusers LoRA names; non-adapter entries are an error (full fine-tuning)."""
    out = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(
                f"checkpoint entry {key!r} is not a LoRA weight of the 'default' adapter; only LoRA runs "
                "(model.lora set) can be exported in diffusers' LoRA format"
            )
        out[f"{m['module']}.{m['kind']}.weight"] = value.detach().cpu().contiguous()
    if not out:
        raise ValueError("the checkpoint holds no LoRA weights to export")
    return out


def lora_metadata(lora: dict[str, Any]) -> dict[str, Any]:
    """The ``LoraConfig`` the policy trained with (as ``FlowPolicy.setup_finetuning`` builds it), as a dict."""
    from peft import LoraConfig

    cfg = dict(lora)
    r = int(cfg.pop("r"))
    alpha = float(cfg.pop("alpha", 2 * r))
    return LoraConfig(r=r, lora_alpha=alpha, **cfg).to_dict()


def _pipeline_class(target: str) -> type:
    from hydra.utils import get_class

    policy_cls = get_class(target)
    if not hasattr(policy_cls, "_pipeline_class"):
        raise ValueError(f"model {target} is not a diffusers backend (model=flux_dev|sd35_medium|flux_tiny|sd35_tiny)")
    return policy_cls._pipeline_class()


def export_lora(run_dir: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write ``run_dir``'s adapter to ``out`` (``pytorch_lora_weights.safetensors`` + ``export.json``)."""
    from omegaconf import OmegaConf

    if weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {WEIGHTS}, got {weights!r}")
    run_dir, out = Path(run_dir), Path(out)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a run directory written by `python -m tmpo.run`")
    cfg = OmegaConf.load(config_path)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if not model.get("lora"):
        raise ValueError(f"{run_dir} trained without LoRA (model.lora is null): nothing to export as a LoRA")
    pipeline_cls = _pipeline_class(model["_target_"])
    state = load_checkpoint(run_dir)
    layers = diffusers_lora_keys(state["ema"] if weights == "ema" else state["policy"])
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=lora_metadata(model["lora"]),
        safe_serialization=True,
    )
    write_json_atomic({
        "run_dir": str(run_dir.resolve()), "step": int(state["step"]), "weights": weights,
        "pipeline": pipeline_cls.__name__, "base_model": model.get("pretrained"), "revision": model.get("revision"),
        "tensors": len(layers), "load_with": f"{pipeline_cls.__name__}.from_pretrained(<base>).load_lora_weights('{out}')",
    }, out / "export.json")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory of `python -m tmpo.run` (holds config.yaml and checkpoints/)")
    parser.add_argument("--out", required=True, help="folder to write the diffusers LoRA into")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA weights (evaluated in the paper) or the last iterate")
    args = parser.parse_args(argv)
    try:
        path = export_lora(args.run_dir, args.out, args.weights)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export failed: {e}") from None
    print(f"wrote {path / 'pytorch_lora_weights.safetensors'}")


if __name__ == "__main__":
    main()
