"""The schedule, sigma, sampler, guider and noise nodes of custom sampling, on tiny random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusion.sampling.guidance import GuidanceHooks
from diffusion.sampling.guidance_dual import DualCFGGuider
from diffusion.sampling.model_sampling import ModelSampling
from diffusion.sampling.noise import prepare_noise
from diffusion.sampling.schedules import DiscreteSchedule, beta_scheduler
from diffusion.sampling.schedules_extra import align_your_steps_sigmas, sd_turbo_sigmas
from nodes.samplers_custom import PowerNoiseScaler, choose

REFERENCE = Path(__file__).parents[1] / "data" / "comfyui_object_info.json"

NEW_NODES = (
    "SDTurboScheduler", "AlignYourStepsScheduler", "PolyexponentialScheduler", "VPScheduler", "BetaSamplingScheduler",
    "LaplaceScheduler", "FlipSigmas", "SplitSigmasDenoise", "SetFirstSigma", "SamplerEulerAncestral",
    "SamplerEulerAncestralCFGPP", "SamplerLMS", "SamplerDPMPP_2M_SDE", "SamplerDPMPP_3M_SDE", "SamplerDPMPP_SDE",
    "SamplerDPMPP_2S_Ancestral", "SamplerDPMAdaptative", "DualCFGGuider", "AddNoise", "BasicScheduler",
    "KarrasScheduler", "ExponentialScheduler", "SplitSigmas",
)


def _normalise(spec: list) -> tuple:
    """One form for ComfyUI's V1 (`[[options], {...}]`) and V3 (`["COMBO", {"options": ...}]`) renderings;
    tooltips and defaults of file-free combos left as they are."""
    kind, config = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    config.pop("tooltip", None)
    if kind == "COMBO":
        kind = config.pop("options")
        config.pop("multiselect", None)
    return json.dumps(kind), json.dumps(config, sort_keys=True)


@pytest.mark.parametrize("name", NEW_NODES)
def test_interface_matches_comfyui(engine, name):
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))[name]
    ours = engine.registry.get(name).info(engine.env)
    assert ours["input_order"]["required"] == ref["input_order"]["required"]
    for key, spec in ref["input"]["required"].items():
        if name == "BasicScheduler" and key == "scheduler":  # its combo default comes from nodes.sampling
            continue
        assert _normalise(ours["input"]["required"][key]) == _normalise(spec), key
    for key in ("output", "output_name", "output_is_list", "category", "output_node"):
        assert ours[key] == ref[key], key
    assert ours["display_name"] == (ref["display_name"] or name)


# --- schedules ------------------------------------------------------------------------------------------------

def _checkpoint() -> dict:
    return {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}}


def _sigmas(engine, node: dict) -> torch.Tensor:
    prompt = _checkpoint() | {"10": node} | _consumer("10")
    return engine.outputs(prompt, "10")[0]


def _consumer(source: str) -> dict:
    """A tiny output branch so that `source` runs: SamplerCustom over its sigmas, decoded and previewed."""
    return {
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "90": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "91": {"class_type": "SamplerCustom", "inputs": {
            "model": ["4", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0, "positive": ["6", 0],
            "negative": ["6", 0], "sampler": ["90", 0], "sigmas": [source, 0], "latent_image": ["5", 0]}},
        "92": {"class_type": "VAEDecode", "inputs": {"samples": ["91", 0], "vae": ["4", 2]}},
        "93": {"class_type": "PreviewImage", "inputs": {"images": ["92", 0]}},
    }


def test_model_schedulers_use_the_models_schedule(engine):
    schedule = DiscreteSchedule.from_config()
    turbo = _sigmas(engine, {"class_type": "SDTurboScheduler", "inputs": {"model": ["4", 0], "steps": 4,
                                                                         "denoise": 1.0}})[0]
    torch.testing.assert_close(turbo, sd_turbo_sigmas(schedule, 4))
    assert turbo[1].item() == pytest.approx(float(schedule.sigmas[899]), rel=1e-5)
    beta = _sigmas(engine, {"class_type": "BetaSamplingScheduler", "inputs": {"model": ["4", 0], "steps": 6,
                                                                             "alpha": 0.4, "beta": 0.9}})[0]
    torch.testing.assert_close(beta, beta_scheduler(schedule, 6, 0.4, 0.9))
    ays = _sigmas(engine, {"class_type": "AlignYourStepsScheduler", "inputs": {"model_type": "SD1", "steps": 5,
                                                                              "denoise": 1.0}})[0]
    torch.testing.assert_close(ays, align_your_steps_sigmas("SD1", 5))


def test_sigma_nodes(engine):
    reg = engine.registry
    sigmas = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert reg.get("FlipSigmas")().execute(sigmas)[0].tolist() == pytest.approx([1e-4, 1.0, 2.0, 3.0, 4.0])
    high, low = reg.get("SplitSigmasDenoise")().execute(sigmas, 0.25)
    assert high.tolist() == [4.0, 3.0, 2.0, 1.0] and low.tolist() == [1.0, 0.0]
    assert reg.get("SetFirstSigma")().execute(sigmas, 9.5)[0].tolist() == [9.5, 3.0, 2.0, 1.0, 0.0]
    poly = reg.get("PolyexponentialScheduler")().execute(3, 10.0, 0.1, 1.0)[0]
    assert poly.tolist() == pytest.approx([10.0, 1.0, 0.1, 0.0], rel=1e-6)
    vp = reg.get("VPScheduler")().execute(2, 19.9, 0.1, 0.001)[0]
    assert vp[1].item() == pytest.approx((2.71828182845 ** (19.9e-6 / 2 + 1e-4) - 1) ** 0.5, rel=1e-4)
    laplace = reg.get("LaplaceScheduler")().execute(3, 14.6, 0.03, 0.5, 0.5)[0]
    assert laplace.tolist() == pytest.approx([14.6, 1.6487213, 0.03, 0.0], rel=1e-6)  # middle: e^mu


# --- samplers -------------------------------------------------------------------------------------------------

def _custom(sampler_node: str, inputs: dict, seed: int = 1) -> dict:
    return {
        "class_type": "SamplerCustom", "inputs": {
            "model": ["4", 0], "add_noise": True, "noise_seed": seed, "cfg": 4.0, "positive": ["6", 0],
            "negative": ["7", 0], "sampler": [sampler_node, 0], "sigmas": ["41", 0], "latent_image": ["5", 0]}}


def _sampler_prompt(node: str, a: dict, b: dict) -> dict:
    """Two SamplerCustom runs of the same SAMPLER node with options `a` and `b`; same seed, schedule, prompt."""
    prompt = _checkpoint() | {
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blue", "clip": ["4", 1]}},
        "41": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 4,
                                                          "denoise": 1.0}},
        "50": {"class_type": node, "inputs": a}, "51": {"class_type": node, "inputs": b},
        "60": _custom("50", {}), "61": _custom("51", {}),
    }
    for i, src in (("70", "60"), ("72", "61")):
        prompt[i] = {"class_type": "VAEDecode", "inputs": {"samples": [src, 0], "vae": ["4", 2]}}
        prompt[str(int(i) + 1)] = {"class_type": "PreviewImage", "inputs": {"images": [i, 0]}}
    return prompt


ER_SDE = {"solver_type": "ER-SDE", "max_stage": 3, "eta": 1.0, "s_noise": 1.0}
SA_SOLVER = {"model": ["4", 0], "eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8, "s_noise": 1.0,
             "predictor_order": 3, "corrector_order": 4, "use_pece": False, "simple_order_2": False}

# (node, default options, the same with one option changed): the change must change the result.
SAMPLER_CASES = [
    ("SamplerEulerAncestral", {"eta": 1.0, "s_noise": 1.0}, {"eta": 0.5}),
    ("SamplerEulerAncestral", {"eta": 1.0, "s_noise": 1.0}, {"s_noise": 0.5}),
    ("SamplerLMS", {"order": 4}, {"order": 1}),
    ("SamplerDPMPP_2M_SDE", {"solver_type": "midpoint", "eta": 1.0, "s_noise": 1.0, "noise_device": "cpu"},
     {"solver_type": "heun"}),
    ("SamplerDPMPP_2M_SDE", {"solver_type": "midpoint", "eta": 1.0, "s_noise": 1.0, "noise_device": "cpu"},
     {"eta": 0.0}),
    ("SamplerDPMPP_3M_SDE", {"eta": 1.0, "s_noise": 1.0, "noise_device": "cpu"}, {"s_noise": 0.0}),
    ("SamplerDPMPP_SDE", {"eta": 1.0, "s_noise": 1.0, "r": 0.5, "noise_device": "cpu"}, {"r": 0.3}),
    ("SamplerDPMPP_2S_Ancestral", {"eta": 1.0, "s_noise": 1.0}, {"eta": 0.0}),
    ("SamplerDPMAdaptative", {"order": 3, "rtol": 0.5, "atol": 0.05, "h_init": 0.05, "pcoeff": 0.0,
                              "icoeff": 1.0, "dcoeff": 0.0, "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0},
     {"order": 2}),
    ("SamplerEulerAncestralCFGPP", {"eta": 1.0, "s_noise": 1.0}, {"eta": 0.5}),
    ("SamplerER_SDE", ER_SDE, {"max_stage": 1}),
    ("SamplerER_SDE", ER_SDE, {"s_noise": 0.0}),
    ("SamplerER_SDE", ER_SDE | {"solver_type": "Reverse-time SDE"}, {"eta": 0.5}),
    ("SamplerER_SDE", ER_SDE, {"solver_type": "ODE"}),
    ("SamplerSASolver", SA_SOLVER, {"eta": 0.0}),
    ("SamplerSASolver", SA_SOLVER, {"sde_end_percent": 0.95}),  # takes in sigma 0.45
    ("SamplerSASolver", SA_SOLVER, {"predictor_order": 1}),
    ("SamplerSASolver", SA_SOLVER, {"use_pece": True}),
]


@pytest.mark.parametrize("node, base, change", SAMPLER_CASES,
                         ids=[f"{n}-{next(iter(c))}" for n, _, c in SAMPLER_CASES])
def test_sampler_nodes_run_and_pass_their_options(engine, node, base, change):
    prompt = _sampler_prompt(node, base, base | change)
    a = engine.outputs(prompt, "60")[0][0]["samples"]
    b = engine.outputs(prompt, "61")[0][0]["samples"]
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-4, f"{node}: changing {change} changed nothing"


@pytest.mark.parametrize("node, a, b", [
    ("SamplerER_SDE", {"solver_type": "ODE", "eta": 1.0}, {"solver_type": "Reverse-time SDE", "eta": 0.0}),
    ("SamplerER_SDE", {"solver_type": "ER-SDE", "eta": 1.0}, {"solver_type": "ER-SDE", "eta": 0.3}),
    ("SamplerDPMPP_2M_SDE", {"noise_device": "gpu"}, {"noise_device": "cpu"}),
])
def test_sampler_options_that_mean_the_same(engine, node, a, b):
    """ER-SDE's ODE is its reverse-time SDE at eta 0, and its own noise scale ignores eta (as ComfyUI's);
    on the CPU the `_gpu` samplers draw the same noise as the CPU ones."""
    base = {"SamplerER_SDE": ER_SDE, "SamplerDPMPP_2M_SDE": {"solver_type": "midpoint", "eta": 1.0, "s_noise": 1.0}}
    prompt = _sampler_prompt(node, base[node] | a, base[node] | b)
    torch.testing.assert_close(engine.outputs(prompt, "60")[0][0]["samples"],
                               engine.outputs(prompt, "61")[0][0]["samples"])
    if node == "SamplerDPMPP_2M_SDE":
        names = [engine.outputs(prompt, n)[0][0].name for n in ("50", "51")]
        assert names == ["dpmpp_2m_sde_gpu", "dpmpp_2m_sde"]


def test_sampler_choices_carry_the_converted_options(engine):
    reg = engine.registry
    model = engine.outputs(_sampler_prompt("SamplerLMS", {"order": 4}, {"order": 4}), "4")[0][0]
    sa = dict(reg.get("SamplerSASolver")().execute(model, 1.0, 0.2, 0.8, 1.0, 3, 4, True, False)[0].options)
    assert sa["sde_start_sigma"] == pytest.approx(model.model_sampling.percent_to_sigma(0.2))
    assert sa["sde_start_sigma"] == pytest.approx(5.0924, abs=1e-3)  # SD's sigma at t = 799
    assert sa["sde_end_sigma"] == pytest.approx(0.5712, abs=1e-3) and sa["use_pece"] is True
    er = reg.get("SamplerER_SDE")()
    assert dict(er.execute("Reverse-time SDE", 2, 1.0, 0.7)[0].options) == {
        "s_noise": 0.7, "noise_scaler": PowerNoiseScaler(2.0), "max_stage": 2}
    assert dict(er.execute("ODE", 3, 1.0, 0.7)[0].options)["noise_scaler"](3.0) == 3.0
    assert dict(er.execute("ER-SDE", 3, 0.2, 1.0)[0].options)["noise_scaler"] is None
    with pytest.raises(ValueError, match="unknown sampler"):
        choose("no_such_sampler")


def test_sampler_node_with_defaults_equals_ksampler_select(engine):
    """Options equal to the sampler's own defaults give KSamplerSelect's result exactly."""
    prompt = _sampler_prompt("SamplerDPMPP_2S_Ancestral", {"eta": 1.0, "s_noise": 1.0}, {"eta": 1.0, "s_noise": 1.0})
    prompt["51"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2s_ancestral"}}
    select = engine.outputs(prompt, "61")[0][0]["samples"]
    torch.testing.assert_close(engine.outputs(prompt, "60")[0][0]["samples"], select)


# --- DualCFGGuider --------------------------------------------------------------------------------------------

def _const_cond(value: float) -> list:
    return [(torch.full((1, 3, 4), value), {})]


def _toy_denoiser(x, sigma, context, **_):
    """Denoised estimate that depends on x, sigma and the conditioning's value (per batch entry)."""
    return 0.5 * x / (1 + sigma.reshape(-1, 1, 1, 1)) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("style", ["regular", "nested"])
@pytest.mark.parametrize("s1, s2", [(3.0, 5.5), (1.0, 1.0), (2.0, 1.0)])
def test_dual_cfg_against_the_formula(style, s1, s2):
    ms = ModelSampling(DiscreteSchedule.from_config())
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(2.0)
    guider = DualCFGGuider(_toy_denoiser, ms, _const_cond(1.0), _const_cond(-2.0), _const_cond(0.25), s1, s2, style)
    p, m, n = (_toy_denoiser(x, sigma.expand(2), torch.full((2, 3, 4), v)) for v in (1.0, -2.0, 0.25))
    regular = n + s1 * (p - m) + s2 * (m - n)
    nested = n + s2 * ((m + s1 * (p - m)) - n)
    expected = regular if style == "regular" else nested
    torch.testing.assert_close(guider(x, sigma), expected, atol=1e-5, rtol=1e-5)


def test_dual_cfg_runs_guidance_hooks_on_each_inner_cfg():
    ms = ModelSampling(DiscreteSchedule.from_config())
    x = torch.zeros(1, 4, 3, 3)
    seen = []

    def combine(step):
        seen.append((float(step.cond.mean()), float(step.uncond.mean()), step.cond_scale))
        return step.cond  # a patch that ignores the uncond side

    hooks = GuidanceHooks(combine=combine)
    guider = DualCFGGuider(_toy_denoiser, ms, _const_cond(1.0), _const_cond(-2.0), _const_cond(0.25), 3.0, 5.0,
                           "regular", hooks=hooks)
    out = guider(x, torch.tensor(1.0))
    assert seen == [(1.0, -2.0, 3.0), (-2.0, 0.25, 5.0)]
    torch.testing.assert_close(out, torch.full_like(x, 1.0))  # p - m + m
    with pytest.raises(ValueError, match="style"):
        DualCFGGuider(_toy_denoiser, ms, _const_cond(1.0), _const_cond(-2.0), _const_cond(0.25), 3.0, 5.0, "both")


def _guider_prompt() -> dict:
    prompt = _sampler_prompt("KSamplerSelect", {"sampler_name": "euler"}, {"sampler_name": "euler"})
    prompt["42"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    prompt["43"] = {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0],
                                                         "negative": ["7", 0], "cfg": 6.0}}
    # cond2 = cond1: the regular form reduces to one CFG of cond1 against the negative at cfg_cond2_negative
    prompt["44"] = {"class_type": "DualCFGGuider", "inputs": {
        "model": ["4", 0], "cond1": ["6", 0], "cond2": ["6", 0], "negative": ["7", 0], "cfg_conds": 2.5,
        "cfg_cond2_negative": 6.0, "style": "regular"}}
    for node, guider in (("60", "43"), ("61", "44")):
        prompt[node] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["42", 0], "guider": [guider, 0], "sampler": ["50", 0], "sigmas": ["41", 0],
            "latent_image": ["5", 0]}}
    return prompt


def test_dual_cfg_guider_node_reduces_to_cfg(engine):
    prompt = _guider_prompt()
    cfg = engine.outputs(prompt, "60")[0][0]["samples"]
    torch.testing.assert_close(engine.outputs(prompt, "61")[0][0]["samples"], cfg, atol=2e-3, rtol=2e-3)
    prompt["44"]["inputs"]["cond2"] = ["7", 0]  # a real second conditioning changes the picture
    assert (engine.outputs(prompt, "61")[0][0]["samples"] - cfg).abs().max() > 1e-3


# --- AddNoise -------------------------------------------------------------------------------------------------

def test_add_noise(engine):
    prompt = _checkpoint() | {
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "20": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                      "color": 0x3366CC}},
        "21": {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["4", 2]}},
        "41": {"class_type": "KarrasScheduler", "inputs": {"steps": 3, "sigma_max": 7.0, "sigma_min": 0.1,
                                                           "rho": 7.0}},
        "42": {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}},
        "43": {"class_type": "AddNoise", "inputs": {"model": ["4", 0], "noise": ["42", 0], "sigmas": ["41", 0],
                                                    "latent_image": ["21", 0]}},
        "44": {"class_type": "AddNoise", "inputs": {"model": ["4", 0], "noise": ["42", 0], "sigmas": ["41", 0],
                                                    "latent_image": ["5", 0]}},
    }
    prompt |= {"50": {"class_type": "VAEDecode", "inputs": {"samples": ["43", 0], "vae": ["4", 2]}},
               "51": {"class_type": "PreviewImage", "inputs": {"images": ["50", 0]}},
               "52": {"class_type": "VAEDecode", "inputs": {"samples": ["44", 0], "vae": ["4", 2]}},
               "53": {"class_type": "PreviewImage", "inputs": {"images": ["52", 0]}}}
    latent = engine.outputs(prompt, "21")[0][0]["samples"]
    noise = prepare_noise(latent, 9)
    scale = 0.18215  # SD1's latent scale: the noise is added in the model's space
    torch.testing.assert_close(engine.outputs(prompt, "43")[0][0]["samples"], latent + noise * 7.0 / scale,
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(engine.outputs(prompt, "44")[0][0]["samples"], noise * 7.0 / scale, atol=1e-4, rtol=1e-5)
    add = engine.registry.get("AddNoise")()
    model = engine.outputs(prompt, "4")[0][0]
    source = engine.outputs(prompt, "42")[0][0]
    assert add.execute(model, source, torch.zeros(0), {"samples": latent})[0]["samples"] is latent
    one = add.execute(model, source, torch.tensor([2.0]), {"samples": latent})[0]["samples"]
    torch.testing.assert_close(one, latent + noise * 2.0 / scale, atol=1e-4, rtol=1e-5)
    span = add.execute(model, source, torch.tensor([5.0, 2.0]), {"samples": latent})[0]["samples"]
    torch.testing.assert_close(span, latent + noise * 3.0 / scale, atol=1e-4, rtol=1e-5)
