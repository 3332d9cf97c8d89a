"""LoRA and LyCORIS files, textual inversion embeddings, clip skip and VAE swaps on tiny random models.

The oracles, all test-only: diffusers' ``load_lora_weights`` (with ``peft``) and
``load_textual_inversion`` for whole images, the ``lycoris-lora`` package (a real writer of LoCon, LoHa,
LoKr, full and norm files) for the change each of its modules makes to its layer, and diffusers'
``clip_skip``. Run with ``-s`` to see the errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from openldm.adapters.names import layer_table
from tests.oracles import diffusers_pair

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

SIZE = 64
STEPS = 4
PROMPT = "a watercolor painting of a lighthouse at dawn"
NEGATIVE = "blurry"
PIXEL_TOL = 1e-3
DELTA_TOL = 1e-5
ERRORS: dict[str, float] = {}

pytestmark = pytest.mark.usefixtures("single_thread")

TRANSFORMER_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RESNET_CONVS = ("conv1", "conv2")
TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adapters")
    return {variant: diffusers_pair(root, variant, SIZE) for variant in ("sd1", "sd2")}


def _targets(pipe: Any) -> list[tuple[str, str, torch.nn.Module]]:
    """(kohya name, network, module) of every layer a LoCon file of the web UI's kind changes."""
    found = []
    for name, module in pipe.unet.named_modules():
        if name.endswith(TRANSFORMER_LINEARS) and ".attentions." in name or name.endswith(RESNET_CONVS):
            found.append(("lora_unet_" + name.replace(".", "_"), "unet", module))
    for name, module in pipe.text_encoder.named_modules():
        if name.endswith(TEXT_LINEARS):
            full = name if name.startswith("text_model.") else "text_model." + name
            found.append(("lora_te_" + full.replace(".", "_"), "text_encoder", module))
    return found


def write_kohya_lora(pipe: Any, path: Path, seed: int, rank: int = 4) -> Path:
    """A kohya / web UI LoRA (LoCon: convolutions too) with random factors and alpha = rank / 2."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, _, module in _targets(pipe):
        w = module.weight
        kernel = tuple(w.shape[2:])
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], *kernel, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, *(1,) * len(kernel), generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(rank / 2)
    safetensors.torch.save_file(sd, str(path))
    return path


def _images(model: Any, **options: Any) -> np.ndarray:
    return model.txt2img(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        seed=7,
        output_type="np",
        progress=False,
        **options,
    ).images


def _theirs(pipe: Any, **options: Any) -> np.ndarray:
    noise = torch.randn([1, 4, SIZE // 8, SIZE // 8], generator=torch.Generator().manual_seed(7))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        latents=noise,
        output_type="np",
        **options,
    ).images


def _compare(name: str, ours: np.ndarray, theirs: np.ndarray, plain: np.ndarray) -> None:
    err = float(np.abs(ours - theirs).max())
    ERRORS[name] = err
    changed = float(np.abs(theirs - plain).max())
    assert changed > 20 * PIXEL_TOL, (
        f"{name}: the LoRA changes the image by {changed:.1e}: the test is vacuous"
    )
    assert err <= PIXEL_TOL, f"{name}: max abs pixel error {err:.2e} > {PIXEL_TOL}"


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_kohya_lora_matches_diffusers(pairs, tmp_path, variant: str) -> None:
    pair = pairs[variant]
    plain = _theirs(pair.txt2img)
    path = write_kohya_lora(pair.txt2img, tmp_path / "style.safetensors", seed=1)
    pair.txt2img.load_lora_weights(str(path), adapter_name="style")
    pair.txt2img.set_adapters(["style"], adapter_weights=[0.7])
    try:
        theirs = _theirs(pair.txt2img)
    finally:
        pair.txt2img.unload_lora_weights()
    before = {k: v.clone() for k, v in pair.model.unet.state_dict().items()}
    pair.model.load_lora(path, 0.7)
    try:
        ours = _images(pair.model)
    finally:
        pair.model.unload_lora()
    _compare(f"kohya {variant}", ours, theirs, plain)
    after = pair.model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "unload did not restore the weights exactly"


def write_peft_lora(folder: Path, path: Path, seed: int) -> Path:
    """A diffusers / PEFT LoRA saved by diffusers' ``save_lora_weights`` from PEFT's state dicts
    (``lora_A`` / ``lora_B``), random factors, PEFT's alpha in the file's metadata."""
    import transformers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_v", "to_out.0", "conv1", "proj_in"]
    )
    text_config = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "fc1"])
    unet = inject_adapter_in_model(
        unet_config, diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    )
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    text = inject_adapter_in_model(text_config, text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (unet, text):
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(path.parent),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        weight_name=path.name,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    return path


def test_peft_lora_and_two_loras_at_once_match_diffusers(pairs, tmp_path) -> None:
    pair = pairs["sd1"]
    plain = _theirs(pair.txt2img)
    peft_file = write_peft_lora(pair.folder, tmp_path / "peft-style.safetensors", seed=2)
    kohya_file = write_kohya_lora(pair.txt2img, tmp_path / "kohya-style.safetensors", seed=3)
    pipe = pair.txt2img
    pipe.load_lora_weights(str(peft_file), adapter_name="peft")
    try:
        alone = _theirs(pipe)
        pipe.load_lora_weights(str(kohya_file), adapter_name="kohya")
        pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.8, -0.5])
        both = _theirs(pipe)
    finally:
        pipe.unload_lora_weights()
    model = pair.model
    model.load_lora(peft_file)
    try:
        _compare("peft sd1", _images(model), alone, plain)
        model.load_lora(peft_file, 0.8)  # loading a file again changes its weight
        model.load_lora(kohya_file, -0.5)
        assert [u.file.name for u in model.adapters.loras] == ["peft-style", "kohya-style"]
        _compare("peft + kohya sd1", _images(model), both, plain)
    finally:
        model.unload_lora()
    assert model.adapters.patches.originals == {}


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {
        **{f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()},
        **{f"text.{k}": v.clone() for k, v in model.text_encoder.state_dict().items()},
    }


def test_every_spelling_of_a_peft_file_changes_the_same_weights(pairs, tmp_path) -> None:
    """diffusers writes one LoRA several ways (``lora_A``, ``lora.down``, ``lora_linear_layer.down``, the
    attention processors' ``processor.to_q_lora``); each must give the same weights bit for bit."""
    model = pairs["sd1"].model
    source = write_peft_lora(pairs["sd1"].folder, tmp_path / "a.safetensors", seed=4)
    sd = safetensors.torch.load_file(str(source))
    metadata = safetensors.safe_open(str(source), "pt").metadata()

    def respelled(name: str, rename) -> Path:
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file({rename(k): v for k, v in sd.items()}, str(path), metadata=metadata)
        return path

    def processor(key: str) -> str:
        for ours, theirs in (("to_q", "to_q_lora"), ("to_out.0", "to_out_lora")):
            key = key.replace(f".{ours}.lora_A.", f".processor.{theirs}.down.")
            key = key.replace(f".{ours}.lora_B.", f".processor.{theirs}.up.")
        return key

    spellings = [
        respelled("dot", lambda k: k.replace("lora_A", "lora.down").replace("lora_B", "lora.up")),
        respelled(
            "linear",
            lambda k: k.replace("lora_A", "lora_linear_layer.down").replace("lora_B", "lora_linear_layer.up"),
        ),
        respelled("processor", processor),
    ]
    model.load_lora(source)
    expected = _weights(model)
    model.unload_lora()
    plain = _weights(model)
    changed = [k for k in plain if not torch.equal(plain[k], expected[k])]
    assert len(changed) > 20
    for path in spellings:
        model.load_lora(path)
        got = _weights(model)
        model.unload_lora()
        assert all(torch.equal(got[k], expected[k]) for k in expected), path.name


LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
LYCORIS_CASES = {
    "locon": {"algo": "locon"},
    "locon-tucker": {"algo": "locon", "use_tucker": True},
    "loha": {"algo": "loha"},
    "loha-tucker": {"algo": "loha", "use_tucker": True},
    "lokr": {"algo": "lokr", "factor": 4},
    "lokr-full": {"algo": "lokr", "factor": 4, "full_matrix": True},
    "full": {"algo": "full"},
    "lora+norms": {"algo": "lora", "train_norm": True},
}


def _lycoris_change(module: Any, multiplier: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the module's forward adds to its layer: the rebuilt change with alpha/rank applied once,
    times the multiplier (not lycoris-lora 4.1.3's ``get_diff_weight``, which scales LoHa/LoKr twice)."""
    kind = type(module).__name__
    if kind == "LoConModule":
        return module.make_weight().reshape(module.shape) * module.scale * multiplier, None
    if kind in ("LohaModule", "LokrModule"):
        return module.get_weight(module.shape) * multiplier, None
    if kind == "FullModule":  # its weight is the layer's new weight; the file keeps the difference
        weight, bias = module.get_diff_weight(1.0)
        return weight * multiplier, bias * multiplier if bias is not None else None
    assert kind == "NormModule", kind
    bias = module.b_norm * multiplier if module.b_norm is not None else None
    return module.w_norm * multiplier, bias


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_files_add_what_their_modules_add(pairs, tmp_path, case: str) -> None:
    pytest.importorskip("lycoris")
    from lycoris.kohya import create_network

    pair = pairs["sd1"]
    preset = tmp_path / "preset.toml"
    preset.write_text(LYCORIS_PRESET)
    import transformers

    unet = diffusers.UNet2DConditionModel.from_pretrained(pair.folder / "unet")
    text_encoder = transformers.CLIPTextModel.from_pretrained(pair.folder / "text_encoder")
    network = create_network(
        1.0,
        4,
        2.0,
        None,
        text_encoder,
        unet,
        conv_dim=4,
        conv_alpha=1.0,
        preset=str(preset),
        **LYCORIS_CASES[case],
    )
    network.apply_to(text_encoder, unet, True, True)  # registers the modules (their forward is not used)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / f"{case}.safetensors"
    network.save_weights(str(path), torch.float32, None)

    model = pair.model
    layers = layer_table(model.unet, model.spec.unet, model.text_encoder)
    before = _weights(model)
    model.load_lora(path, 0.6)
    after = _weights(model)
    model.unload_lora()
    worst = 0.0
    modules = network.text_encoder_loras + network.unet_loras
    for module in modules:
        layer = layers[module.lora_name]
        prefix = "unet." if layer.network == "unet" else "text."
        for part, change in zip(("weight", "bias"), _lycoris_change(module, 0.6), strict=True):
            key = f"{prefix}{layer.path}.{part}"
            if key not in after:  # a layer without a bias
                assert change is None, key
                continue
            ours = after[key] - before[key]
            if change is None:
                assert torch.equal(ours, torch.zeros_like(ours)), key
                continue
            worst = max(worst, float((ours - change.detach().reshape(ours.shape)).abs().max()))
    ERRORS[f"lycoris {case}"] = worst
    assert len(modules) > 50
    assert worst <= DELTA_TOL
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
