"""The mini backend: tokenizer, text encoder, DiT/MMDiT denoisers, schedule, LoRA, checkpoints,
the resumable pretraining script and a tree rollout on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tmpo.policies import mini, mini_pretrain
from tmpo.policies.mini import MiniConfig, MiniPolicy, shifted_sigmas
from tmpo.policies.mini_text import text_tokenizer
from tmpo.world import ALL_TAGS, sample_random_prompt

TINY = {"width": 32, "depth": 1, "heads": 2}
TINY_FLAGS = ["--width", "32", "--depth", "1", "--heads", "2", "--text-layers", "1"]
LORA = {"r": 4, "alpha": 8, "target_modules": ["qkv", "q", "kv", "out", "fc1", "fc2"]}
MMDIT_LORA = {"r": 4, "alpha": 8, "target_modules": ["img_qkv", "txt_qkv", "img_out", "txt_out", "fc1", "fc2"]}
CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


def tiny_policy(arch: str = "dit", lora: dict | None = LORA, **kw) -> MiniPolicy:
    return MiniPolicy(arch=arch, lora=lora, random_init=True, model_config=TINY, **kw)


def wake(policy: MiniPolicy, std: float = 0.05) -> MiniPolicy:
    """Random values for the zero-initialised adaLN/output layers, so that every input matters."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in policy.net.named_parameters():
            if ("ada" in name or "final_linear" in name) and "lora_" not in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return policy


def perturb_lora(policy: MiniPolicy, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in policy.trainable_named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_round_trip_all_tags():
    tok = text_tokenizer()
    rng = np.random.default_rng(0)
    for tag in ALL_TAGS:
        for _ in range(40):
            prompt = sample_random_prompt(rng, [tag])["prompt"]
            assert tok.decode(tok.encode(prompt)) == prompt


def test_tokenizer_splits_sign_text_into_characters():
    tok = text_tokenizer()
    assert tok.tokenize('a sign that reads "K7Q"') == ["a", "sign", "that", "reads", "<q>", "<c:K>", "<c:7>", "<c:Q>", "</q>"]
    # Both quote marks share one embedding row in the denoiser's layout.
    assert tok.encode('"K"')[1] == tok.encode('"K"')[3] == tok.index["<q>"]
    assert tok.encode("") == [tok.index["<bos>"]]  # the caption-dropout / CFG null prompt
    ids, mask = tok(["a photo of a circle", 'a sign that reads "AB"'])
    assert ids.shape == mask.shape == (2, 9) and mask.sum(1).tolist() == [6, 9]


def test_tokenizer_unknown_word_is_named():
    with pytest.raises(ValueError, match="'dog'"):
        text_tokenizer().encode("a photo of a dog")
    with pytest.raises(ValueError, match="sign alphabet"):
        text_tokenizer().encode('a sign that reads "k7"')


# --- shapes, schedule, decode -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["dit", "mmdit"])
def test_encode_and_velocity_shapes(arch):
    policy = tiny_policy(arch, lora=None)
    tokens, mask = policy.encode_prompts(["a photo of a red circle", 'a sign that reads "K7Q"'])
    assert tokens.shape == (2, 10, 32) and mask.shape == (2, 10) and mask.dtype == torch.bool
    x = torch.randn(5, *policy.latent_shape)
    index = torch.tensor([0, 1, 1, 0, 1])
    v = policy.velocity(x, torch.rand(5), (tokens, mask), index)
    assert v.shape == (5, 3, 32, 32) and torch.isfinite(v).all()
    # each sample sees its own prompt: same as evaluating the rows one by one
    one = policy.velocity(x[1:2], torch.full((1,), 0.5), (tokens[1:2], mask[1:2]), torch.tensor([0]))
    both = policy.velocity(x[:2], torch.full((2,), 0.5), (tokens, mask), torch.tensor([0, 1]))
    assert torch.allclose(one[0], both[1], atol=1e-5)


def test_sigmas_shift_schedule():
    policy = tiny_policy(lora=None, shift=3.0)
    s = policy.sigmas(4)
    # s = 1, .75, .5, .25, 0 -> 3s / (1 + 2s)
    assert torch.allclose(s, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    s28 = policy.sigmas(28)
    assert s28.shape == (29,) and s28[0] == 1 and s28[-1] == 0 and bool((s28[1:] < s28[:-1]).all())
    assert torch.allclose(shifted_sigmas(6, 1.0), torch.linspace(1, 0, 7))
    with pytest.raises(ValueError):
        shifted_sigmas(4, 0.0)


def test_decode_range():
    policy = tiny_policy(lora=None)
    img = policy.decode(3 * torch.randn(4, 3, 32, 32))
    assert img.min() >= 0 and img.max() <= 1
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(policy.decode(MiniPolicy.encode_images(x)), x)


def test_guidance_scale_optional():
    policy = wake(tiny_policy(lora=None))
    cond = policy.encode_prompts(["a photo of a circle"])
    x, s, idx = torch.randn(2, 3, 32, 32), torch.full((2,), 0.7), torch.zeros(2, dtype=torch.long)
    v1 = policy.velocity(x, s, cond, idx)
    policy.guidance_scale = 4.0
    v4 = policy.velocity(x, s, cond, idx)
    assert v4.shape == v1.shape and not torch.allclose(v1, v4)


# --- LoRA / reference -------------------------------------------------------------------------


@pytest.mark.parametrize("arch,lora", [("dit", LORA), ("mmdit", MMDIT_LORA)])
def test_lora_trainable_params_and_reference(arch, lora):
    policy = tiny_policy(arch, lora=lora)
    names = [n for n, _ in policy.trainable_named_parameters()]
    assert names and all("lora_" in n for n in names)
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    cond = policy.encode_prompts(["a photo of two squares", "a photo of a cross"])
    x, s, idx = torch.randn(4, 3, 32, 32), torch.rand(4), torch.tensor([0, 0, 1, 1])
    wake(policy)  # non-zero gates and output, so the test has teeth
    base = policy.velocity(x, s, cond, idx)
    with policy.reference():
        assert torch.equal(policy.velocity(x, s, cond, idx), base)  # LoRA B = 0 at start: policy == reference
    perturb_lora(policy)
    tuned = policy.velocity(x, s, cond, idx)
    assert not torch.allclose(tuned, base)
    with policy.reference():
        assert torch.allclose(policy.velocity(x, s, cond, idx), base, atol=1e-6)


def test_full_finetuning_reference_is_frozen_copy():
    policy = tiny_policy(lora=None)
    assert all(p.requires_grad for _, p in policy.trainable_named_parameters())
    assert len(policy.trainable_named_parameters()) == len(list(policy.net.parameters()))


def test_yaml_configs_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for name, arch in (("mini", "dit"), ("mini_mmdit", "mmdit")):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg.arch == arch and cfg.lora.r == 16 and cfg.lora.alpha == 32
        policy = instantiate(cfg, random_init=True, model_config=TINY)
        assert isinstance(policy, MiniPolicy) and policy.config.arch == arch
        names = [n for n, _ in policy.trainable_named_parameters()]
        assert names and all("lora_" in n for n in names)


# --- checkpoints ------------------------------------------------------------------------------


def write_tiny_checkpoint(path: Path, arch: str = "dit") -> mini_pretrain.Bundle:
    torch.manual_seed(0)
    cfg = MiniConfig(arch=arch, **TINY)
    bundle = mini_pretrain.Bundle(cfg)
    for p in bundle.denoiser.final_linear.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.save(mini_pretrain.published_state(bundle, cfg, {"note": "test"}), path)
    return bundle


@pytest.mark.parametrize("arch", ["dit", "mmdit"])
def test_checkpoint_round_trip(tmp_path, arch):
    path = tmp_path / f"{arch}.pt"
    bundle = write_tiny_checkpoint(path, arch)
    policy = MiniPolicy(checkpoint=str(path), arch=arch, lora=None)
    assert policy.card == {"note": "test"}
    prompts = ["a photo of a blue diamond", "a photo of a circle below a square"]
    ids, mask = text_tokenizer()(prompts)
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        want = bundle(x, s, ids, mask)
    got = policy.velocity(x, s, policy.encode_prompts(prompts), torch.arange(2))
    assert torch.allclose(got, want, atol=1e-6)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mini_pretrain --arch dit"):
        MiniPolicy(checkpoint=str(tmp_path / "missing.pt"), arch="dit")
    write_tiny_checkpoint(tmp_path / "dit.pt", "dit")
    with pytest.raises(ValueError, match="'dit' model, but arch='mmdit'"):
        MiniPolicy(checkpoint=str(tmp_path / "dit.pt"), arch="mmdit")
    state = torch.load(tmp_path / "dit.pt", weights_only=True)
    state["config"]["width"] = 48
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match"):
        MiniPolicy(checkpoint=str(tmp_path / "bad.pt"), arch="dit")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a mini checkpoint"):
        MiniPolicy(checkpoint=str(tmp_path / "foreign.pt"), arch="dit")


# --- pretraining script -----------------------------------------------------------------------


def test_pretrain_resumes(tmp_path):
    out = tmp_path / "dit.pt"
    flags = ["--out", str(out), "--batch", "4", "--buffer", "8", "--fresh", "2", "--no-eval", "--log-every", "1", *TINY_FLAGS]
    first = mini_pretrain.main([*flags, "--steps", "3"])
    assert first["step"] == 3 and first["resumed_from"] is None
    state_file = mini_pretrain.train_state_path(out)
    assert state_file.exists() and out.exists() and mini_pretrain.card_path(out).exists()
    weights_after_3 = torch.load(out, weights_only=True)["denoiser"]
    second = mini_pretrain.main([*flags, "--steps", "5"])
    assert second["resumed_from"] == 3 and second["step"] == 5
    state = torch.load(state_file, weights_only=False)
    assert state["step"] == 5
    adam_steps = {float(v["step"]) for v in state["optimizer"]["state"].values()}
    assert adam_steps == {5.0}  # the optimizer state was restored, not restarted
    card = json.loads(mini_pretrain.card_path(out).read_text())
    assert card["steps"] == 5 and card["status"] == "trained"
    policy = MiniPolicy(checkpoint=str(out), arch="dit", lora=LORA)  # the published file is usable
    assert policy.config.width == 32
    new = torch.load(out, weights_only=True)["denoiser"]
    assert any(not torch.equal(weights_after_3[k], new[k]) for k in new)
    with pytest.raises(ValueError, match="different|not"):
        mini_pretrain.main([*flags[:-6], "--width", "48", "--depth", "1", "--heads", "2", "--text-layers", "1", "--steps", "6"])


def test_pretrain_warm_start_from_published_checkpoint(tmp_path):
    base = tmp_path / "base.pt"
    flags = ["--batch", "4", "--buffer", "8", "--fresh", "2", "--no-eval", "--log-every", "1", *TINY_FLAGS]
    mini_pretrain.main(["--out", str(base), *flags, "--steps", "3"])
    published = torch.load(base, weights_only=True)
    # Zero steps: the warm-started model publishes exactly the weights it was initialised from.
    copy_out = tmp_path / "copy.pt"
    mini_pretrain.main(["--out", str(copy_out), "--init", str(base), *flags, "--steps", "0"])
    copied = torch.load(copy_out, weights_only=True)
    for part in ("denoiser", "text_encoder"):
        assert all(torch.equal(published[part][k], copied[part][k]) for k in published[part])
    # Two steps on top: a fresh optimizer (Adam step count 2), the card traces the total training.
    out = tmp_path / "continued.pt"
    summary = mini_pretrain.main(["--out", str(out), "--init", str(base), *flags, "--steps", "2", "--seed", "1"])
    assert summary["step"] == 2 and summary["resumed_from"] is None
    state = torch.load(mini_pretrain.train_state_path(out), weights_only=False)
    assert {float(v["step"]) for v in state["optimizer"]["state"].values()} == {2.0}
    card = json.loads(mini_pretrain.card_path(out).read_text())
    assert card["init"]["steps"] == 3 and card["steps_total"] == 5 and card["steps"] == 2
    # A resume of the continued run keeps the init record (the train state carries it).
    mini_pretrain.main(["--out", str(out), "--init", str(base), *flags, "--steps", "3", "--seed", "1"])
    assert json.loads(mini_pretrain.card_path(out).read_text())["steps_total"] == 6
    with pytest.raises(ValueError, match="matching architecture"):
        mini_pretrain.main(["--out", str(tmp_path / "x.pt"), "--init", str(base), *flags[:-8],
                            "--width", "48", "--depth", "1", "--heads", "2", "--text-layers", "1", "--steps", "1"])
    with pytest.raises(FileNotFoundError, match="--init"):
        mini_pretrain.main(["--out", str(tmp_path / "y.pt"), "--init", str(tmp_path / "missing.pt"), *flags, "--steps", "1"])


def test_pretrain_sigterm_checkpoints_and_resumes(tmp_path, monkeypatch):
    import os
    import signal

    out = tmp_path / "dit.pt"
    flags = ["--out", str(out), "--batch", "4", "--buffer", "8", "--fresh", "2", "--no-eval", "--log-every", "1", *TINY_FLAGS]
    calls = {"n": 0}
    real_update = mini_pretrain.ema_update

    def preempt_at_step_2(*args, **kw):  # the "kill": SIGTERM arrives during step 2
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(*args, **kw)

    monkeypatch.setattr(mini_pretrain, "ema_update", preempt_at_step_2)
    killed = mini_pretrain.main([*flags, "--steps", "10"])
    assert killed["step"] == 2 and "metrics" not in killed
    assert json.loads(mini_pretrain.card_path(out).read_text())["status"] == "training"
    monkeypatch.setattr(mini_pretrain, "ema_update", real_update)
    resumed = mini_pretrain.main([*flags, "--steps", "4"])
    assert resumed["resumed_from"] == 2 and resumed["step"] == 4


# --- rollout ----------------------------------------------------------------------------------


def test_tree_rollout_and_recompute():
    from tmpo.samplers import DynamicTreePlan, FlowSampler, edge_log_probs, recompute_means

    policy = wake(tiny_policy(lora=LORA))
    perturb_lora(policy, 0.1)
    prompts = ["a photo of a red circle", "a photo of three triangles"]
    sampler = FlowSampler(DynamicTreePlan(), num_steps=6, eta=0.7, noise="cps")
    r = sampler.rollout(policy, prompts, [{}, {}], 0, 10, torch.Generator().manual_seed(0))
    assert r.group_size == 27 and r.leaves.shape == (54, 3, 32, 32)
    assert torch.bincount(r.group).tolist() == [27, 27]
    parents = torch.arange(r.parent_x.shape[0])
    ids, lp = edge_log_probs(r, parents, recompute_means(policy, r, parents))
    assert torch.equal(ids, torch.arange(r.edge_x_next.shape[0]))
    assert torch.allclose(lp, r.edge_log_prob_old, atol=1e-4, rtol=0)
    images = policy.decode(r.leaves)
    assert images.min() >= 0 and images.max() <= 1


# --- the committed base model -----------------------------------------------------------------


@pytest.mark.skipif(
    not mini.default_checkpoint("dit").exists(),
    reason="tmpo/assets/mini/dit.pt not present; create it with `python -m tmpo.policies.mini_pretrain --arch dit`",
)
def test_committed_dit_checkpoint_loads_and_samples():
    from tmpo.samplers import sample_ode

    policy = MiniPolicy(lora=LORA)
    assert policy.config.arch == "dit"
    card = json.loads(mini.default_checkpoint("dit").with_suffix(".json").read_text())
    assert card["model"] == "mini-dit" and card["steps"] > 0
    x = sample_ode(policy, ["a photo of a red circle"], 2, 4, torch.Generator().manual_seed(0))
    img = policy.decode(x)
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()


def test_eval_only_rescores_a_published_model_and_rewrites_only_its_card(tmp_path, monkeypatch):
    from functools import partial

    from tmpo.world import load_prompts

    out = tmp_path / "dit.pt"
    mini_pretrain.main(["--out", str(out), "--batch", "4", "--buffer", "8", "--fresh", "2", "--no-eval", *TINY_FLAGS, "--steps", "2"])
    before = torch.load(out, weights_only=True)
    assert "base_metrics" not in before["card"]
    train, test = load_prompts("geneval", "train")[:6], load_prompts("geneval", "test")[:4]
    small = partial(mini_pretrain.final_evaluation, sweep_records=train, test_records=test, sweep_images=2, test_images=3)
    monkeypatch.setattr(mini_pretrain, "final_evaluation", small)
    metrics = mini_pretrain.main(["--out", str(out), "--arch", "dit", "--eval-only"])
    sweep = metrics["shift_sweep_geneval_train_per_image"]
    assert set(sweep) == {str(s) for s in mini_pretrain.EVAL_SHIFTS}
    assert metrics["shift"] == float(max(sweep, key=sweep.get))  # the argmax of per-image accuracy
    test_metrics = metrics["geneval_test_official"]
    assert test_metrics["n_images"] == 4 * 3
    k_correct = test_metrics["per_image"] * 12  # k of 12 images
    assert 0.0 <= test_metrics["per_image"] <= 1.0 and abs(k_correct - round(k_correct)) < 1e-9
    after = torch.load(out, weights_only=True)
    for part in ("denoiser", "text_encoder"):
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part])
    card = json.loads(mini_pretrain.card_path(out).read_text())
    assert card["base_metrics"] == after["card"]["base_metrics"] == json.loads(json.dumps(metrics))
    assert card["steps"] == 2 and card["status"] == "trained"  # the training record is kept


def test_eval_sampling_in_batches_gives_the_same_samples_whatever_the_batch_size():
    """``eval.batch_size`` bounds memory only: the noises are drawn for the whole set first, and each row
    keeps its own prompt's conditioning even where a batch boundary cuts a prompt's samples (2 of 3)."""
    from tmpo.samplers import sample_ode

    policy = wake(tiny_policy("dit", lora=None))
    prompts = ["a red circle", "two blue squares", "a sign that reads \"AB\""]
    whole = sample_ode(policy, prompts, 3, 4, torch.Generator().manual_seed(5))
    for size in (1, 2, 4, 100):
        batched = sample_ode(policy, prompts, 3, 4, torch.Generator().manual_seed(5), batch_size=size)
        torch.testing.assert_close(batched, whole, rtol=0, atol=1e-5)
    shard = sample_ode(policy, prompts, 3, 4, torch.Generator().manual_seed(5), shard=slice(1, 3), batch_size=2)
    torch.testing.assert_close(shard, whole[3:], rtol=0, atol=1e-5)
    # the prompt changes the samples, so rows conditioned on the wrong prompt would show above
    same_prompt = sample_ode(policy, prompts[:1] * 3, 3, 4, torch.Generator().manual_seed(5))
    assert (same_prompt[3:] - whole[3:]).abs().max() > 1e-3
