"""LoRA and LyCORIS files, textual inversion embeddings, clip skip and VAE swaps on tiny random models.

The oracles, all test-only: diffusers' ``load_lora_weights`` (with ``peft``) and
``load_textual_inversion`` for whole images, the ``lycoris-lora`` package (a real writer of LoCon, LoHa,
LoKr, full and norm files) for the change each of its modules makes to its layer, and diffusers'
``clip_skip``. Run with ``-s`` to see the errors.
"""

from __future__ import annotations

import collections
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


def _generate(model: Any, prompt: str = PROMPT, negative: str = NEGATIVE, **options: Any) -> Any:
    return model.txt2img(
        prompt,
        negative,
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        seed=7,
        output_type="np",
        progress=False,
        **options,
    )


def _images(model: Any, prompt: str = PROMPT, negative: str = NEGATIVE, **options: Any) -> np.ndarray:
    return _generate(model, prompt, negative, **options).images


def _theirs(pipe: Any, prompt: str = PROMPT, **options: Any) -> np.ndarray:
    noise = torch.randn([1, 4, SIZE // 8, SIZE // 8], generator=torch.Generator().manual_seed(7))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    options = {"negative_prompt": NEGATIVE, **options}
    return pipe(
        prompt,
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
    assert model.adapters.patches.changed() == []


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


def _embedding_file(path: Path, layout: str, vectors: torch.Tensor) -> Path:
    """An embedding in one of the layouts found in the wild (the .pt ones written by torch.save)."""
    if layout == "webui-safetensors":
        safetensors.torch.save_file({"emb_params": vectors}, str(path))
    elif layout == "webui-pt":
        torch.save(
            {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 9}, path
        )
    else:  # diffusers' learned_embeds
        safetensors.torch.save_file({"<concept>": vectors}, str(path))
    return path


@pytest.mark.parametrize("layout", ["webui-safetensors", "webui-pt", "diffusers"])
def test_embedding_matches_diffusers_textual_inversion(pairs, tmp_path, layout: str) -> None:
    pair = pairs["sd1"]
    width = pair.model.spec.text.width
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(8))
    suffix = ".pt" if layout == "webui-pt" else ".safetensors"
    path = _embedding_file(tmp_path / f"lighthouse-style{suffix}", layout, vectors)
    prompt = "a painting in lighthouse-style, (lighthouse-style:1.2) at dawn"
    pipe = pair.txt2img
    plain = _theirs(pipe)
    theirs_file = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file({"emb_params": vectors}, str(theirs_file))
    pipe.load_textual_inversion(str(theirs_file), token="lighthouse-style")
    try:
        # diffusers has no weighting syntax: compare the unweighted prompt, then check the weight's effect.
        theirs = _theirs(pipe, "a painting in lighthouse-style at dawn")
    finally:
        pipe.unload_textual_inversion()
    model = pair.model
    embedding = model.load_embedding(path)
    assert embedding.word == "lighthouse-style" and embedding.vectors.shape == (3, width)
    try:
        ours = _images(model, "a painting in lighthouse-style at dawn")
        weighted = _images(model, prompt, negative="lighthouse-style")
    finally:
        model.unload_embedding()
    _compare(f"embedding {layout}", ours, theirs, plain)
    assert float(np.abs(weighted - ours).max()) > 20 * PIXEL_TOL
    assert model.tokenizer.encode("lighthouse-style") != list(range(49408, 49411))


def _skipped_embeds(pipe: Any, prompt: str, layers_skipped: int) -> torch.Tensor:
    """diffusers' clip_skip, spelled out (its own reaches ``text_model``, which transformers 5 removed):
    the hidden state ``layers_skipped`` layers before the last, through the final layer norm."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder(ids.input_ids, output_hidden_states=True)
        norm = getattr(pipe.text_encoder, "final_layer_norm", None)
        norm = norm if norm is not None else pipe.text_encoder.text_model.final_layer_norm
        return norm(out.hidden_states[-(layers_skipped + 1)])


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_clip_skip_matches_diffusers(pairs, variant: str) -> None:
    pair = pairs[variant]
    plain = _theirs(pair.txt2img)
    theirs = _theirs(
        pair.txt2img,
        None,
        prompt_embeds=_skipped_embeds(pair.txt2img, PROMPT, 1),  # the web UI's clip skip 2
        negative_prompt_embeds=_skipped_embeds(pair.txt2img, NEGATIVE, 1),
        negative_prompt=None,
    )
    result = _generate(pair.model, clip_skip=2)
    _compare(f"clip skip {variant}", result.images, theirs, plain)
    assert "Clip skip: 2" in result.parameters[0]
    with pytest.raises(ValueError, match="clip_skip must be at most 2"):
        _images(pair.model, clip_skip=3)


def _other_vae(pair: Any, folder: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A diffusers VAE with other random weights, saved as a diffusers folder, and its original layout."""
    from openldm.checkpoints.formats.vae import vae_from_diffusers
    from tests.oracles import randomize_

    vae = randomize_(diffusers.AutoencoderKL.from_config(pair.txt2img.vae.config), seed=99)
    vae.save_pretrained(folder)
    return vae, vae_from_diffusers(vae.state_dict(), pair.model.spec.vae)


@pytest.mark.parametrize("layout", ["original", "single-file-prefix", "diffusers-file", "diffusers-folder"])
def test_vae_swap_matches_diffusers_with_that_vae(pairs, tmp_path, layout: str) -> None:
    pair = pairs["sd1"]
    plain = _theirs(pair.txt2img)
    vae, original = _other_vae(pair, tmp_path / "vae")
    paths = {
        "original": tmp_path / "ft-vae.safetensors",
        "single-file-prefix": tmp_path / "ft-vae-prefixed.safetensors",
        "diffusers-file": tmp_path / "vae" / "diffusion_pytorch_model.safetensors",
        "diffusers-folder": tmp_path / "vae",
    }
    if layout == "original":
        safetensors.torch.save_file({**original, "loss.logvar": torch.zeros(())}, str(paths[layout]))
    elif layout == "single-file-prefix":
        safetensors.torch.save_file(
            {f"first_stage_model.{k}": v for k, v in original.items()}, str(paths[layout])
        )
    own = pair.txt2img.vae
    pair.txt2img.vae = vae
    try:
        theirs = _theirs(pair.txt2img)
    finally:
        pair.txt2img.vae = own
    model = pair.model
    own_vae = model.vae
    model.load_vae(paths[layout])
    try:
        result = _generate(model)
    finally:
        model.load_vae(None)
    assert model.vae is own_vae
    _compare(f"vae {layout}", result.images, theirs, plain)
    assert f"VAE: {paths[layout].name}" in result.parameters[0] and "VAE hash: " in result.parameters[0]


# --- on the embedded model, through the command line ----------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> Any:
    import openldm

    return openldm.load()


def kohya_lora_for(
    model: Any, path: Path, seed: int, context: int | None = None, **extra: torch.Tensor
) -> Path:
    """A kohya LoRA for one of our models (attention layers and text encoder), random, alpha = rank / 2;
    ``context``: the width its cross-attention keys take (another family's, to make a misfit)."""
    from openldm.checkpoints.formats.unet import unet_key_to_diffusers

    g = torch.Generator().manual_seed(seed)
    sd = dict(extra)
    layers = [
        ("lora_unet_" + unet_key_to_diffusers(name + ".weight", model.spec.unet)[:-7].replace(".", "_"), m)
        for name, m in model.unet.named_modules()
        if isinstance(m, torch.nn.Linear) and ".attn" in name
    ]
    layers += [
        ("lora_te_" + name.replace(".", "_"), m)
        for name, m in model.text_encoder.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    for name, module in layers:
        width = (
            context
            if context is not None and name.endswith(("attn2_to_k", "attn2_to_v"))
            else module.in_features
        )
        sd[f"{name}.lora_down.weight"] = torch.randn(4, width, generator=g) * 0.5
        sd[f"{name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.5
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    safetensors.torch.save_file(sd, str(path))
    return path


def _run(capsys, *argv: Any) -> tuple[int, str]:
    from openldm.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


FAST = ("--steps", "3", "--n_iter", "1", "--n_samples", "1", "--seed", "3", "--skip_grid")


def test_command_line_with_two_loras_an_embedding_and_clip_skip(embedded, tmp_path, capsys) -> None:
    from PIL import Image
    from sd_parsers import ParserManager

    from openldm.images import parse_parameters

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    first = kohya_lora_for(embedded, tmp_path / "first.safetensors", seed=1)
    kohya_lora_for(embedded, lora_dir / "second.safetensors", seed=2)
    word = tmp_path / "shiny.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(2, embedded.spec.text.width)}, str(word))
    prompt = "a red circle, shiny <lora:second:0.5>"
    out = tmp_path / "out"
    argv = ["txt2img", "--outdir", out, *FAST, "--prompt", prompt, "--lora", f"{first}:0.8"]
    argv += ["--lora-dir", lora_dir, "--embedding", word, "--clip-skip", "2"]
    code, err = _run(capsys, *argv)
    assert code == 0, err
    png = out / "samples" / "00000.png"
    params = parse_parameters(Image.open(png).info["parameters"])
    assert params["Prompt"] == prompt and params["Clip skip"] == 2
    hashes = dict(item.split(": ") for item in params["Lora hashes"].split(", "))
    assert set(hashes) == {"first", "second"} and all(len(h) == 12 for h in hashes.values())
    assert params["TI hashes"].startswith("shiny: ")
    parsed = ParserManager().parse(png)
    assert parsed.metadata["Clip skip"] == "2"
    assert parsed.metadata["Hashes"] == {
        "lora:first": hashes["first"],
        "lora:second": hashes["second"],
        "embed:shiny": params["TI hashes"].split(": ")[1],
    }
    # The same run without the adapters is another image; with them, the Python API's image.
    plain, _ = _run(
        capsys, "txt2img", "--outdir", tmp_path / "plain", *FAST, "--prompt", "a red circle, shiny"
    )
    with_api = embedded
    with_api.load_lora(first, 0.8)
    with_api.add_lora_dir(lora_dir)
    with_api.load_embedding(word)
    try:
        api = with_api.txt2img(prompt, steps=3, seed=3, progress=False, clip_skip=2, guidance_scale=7.5)
    finally:
        with_api.unload_lora()
        with_api.unload_embedding()
        with_api.adapters.lora_dirs.clear()
    ours = np.asarray(Image.open(png))
    assert np.array_equal(ours, np.asarray(api.images[0]))
    assert not np.array_equal(ours, np.asarray(Image.open(tmp_path / "plain" / "samples" / "00000.png")))


def _bad_files(model: Any, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra command-line arguments, what the one-line error says)."""
    width = model.spec.text.width
    unknown = kohya_lora_for(
        model,
        tmp_path / "unknown.safetensors",
        1,
        **{"lora_unet_no_such_layer.lora_down.weight": torch.ones(4, 4)},
    )
    sd2 = kohya_lora_for(model, tmp_path / "for-sd2.safetensors", 1, context=1024)
    sdxl = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(
        {"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, str(sdxl)
    )
    dora = kohya_lora_for(
        model,
        tmp_path / "dora.safetensors",
        1,
        **{"lora_unet_mid_block_attentions_0_proj_in.dora_scale": torch.ones(4)},
    )
    text_only = tmp_path / "text-for-sd2.safetensors"
    safetensors.torch.save_file(
        {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 1024),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(width, 4),
        },
        str(text_only),
    )
    nan = kohya_lora_for(model, tmp_path / "nan.safetensors", 1)
    nan_sd = safetensors.torch.load_file(str(nan))
    next(v for k, v in nan_sd.items() if k.endswith("lora_up.weight"))[0, 0] = float("nan")
    safetensors.torch.save_file(nan_sd, str(nan))
    wide = tmp_path / "wide.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(2, 768)}, str(wide))
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, width)}, "hook": collections.Counter()}, evil)
    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    return {
        "unknown key": (["--lora", unknown], "'lora_unet_no_such_layer' names no layer of this sd1 model"),
        "SD 2 LoRA": (["--lora", sd2], "the file was made for SD 2.x"),
        "SDXL LoRA": (["--lora", sdxl], "made for SDXL"),
        "SD 2 text LoRA": (["--lora", text_only], "the file was made for SD 2.x"),
        "NaN": (["--lora", nan], "holds NaN or infinite values"),
        "DoRA": (["--lora", dora], "DoRA (weight-decomposed LoRA), which openldm does not apply"),
        "missing file": (["--lora", tmp_path / "nothing.safetensors:0.5"], "no such file"),
        "missing tag": (["--lora-dir", folder, "--prompt", "a <lora:absent:1>"], "no LoRA named 'absent'"),
        "tag weight": (
            ["--lora-dir", folder, "--prompt", "a <lora:x:heavy>"],
            "a LoRA's weight must be a number",
        ),
        "wide embedding": (["--embedding", wide], "vectors are 768 wide (made for SD 1.x)"),
        "pickled code": (["--embedding", evil], "collections.Counter"),
        "clip skip": (["--clip-skip", "9"], "clip_skip must be at most 4"),
    }


def test_bad_adapter_files_give_one_line_errors(embedded, tmp_path, capsys) -> None:
    for name, (extra, message) in _bad_files(embedded, tmp_path).items():
        out = tmp_path / name.replace(" ", "-")
        code, err = _run(capsys, "txt2img", "--outdir", out, *FAST, *extra)
        assert code == 2, (name, err)
        assert message in err and err.count("\n") == 1, (name, err)
        assert not out.exists() or not any(out.rglob("*.png")), name


def test_lora_tags_in_prompts() -> None:
    from openldm.prompts import lora_tags

    text, tags = lora_tags("a cat <lora:ink:0.5>, <lyco:grain>, (red:1.2) <lora:two:0.2:0.9><hypernet:x:1>")
    assert text == "a cat , , (red:1.2) <hypernet:x:1>"
    assert tags == [("ink", 0.5, 0.5), ("grain", 1.0, 1.0), ("two", 0.2, 0.9)]
    with pytest.raises(ValueError, match="must be a number"):
        lora_tags("<lora:ink:strong>")


def test_a_tag_changes_only_its_generation_and_weights_per_network(embedded, tmp_path) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    kohya_lora_for(embedded, folder / "ink.safetensors", seed=6)
    model = embedded
    model.add_lora_dir(folder)
    plain = _weights(model)
    try:
        tagged = model.txt2img("a red circle <lora:ink:0.4:0.9>", steps=2, seed=1, progress=False)
        assert 'Lora hashes: "ink: ' in tagged.parameters[0]
        patched = _weights(model)
        unet_changed = [k for k in plain if k.startswith("unet.") and not torch.equal(plain[k], patched[k])]
        text_changed = [k for k in plain if k.startswith("text.") and not torch.equal(plain[k], patched[k])]
        assert unet_changed and text_changed
        untagged = model.txt2img("a red circle", steps=2, seed=1, progress=False)
        assert "Lora hashes" not in untagged.parameters[0]
        assert all(torch.equal(plain[k], v) for k, v in _weights(model).items())
        with pytest.raises(ValueError, match="two different weights"):
            model.txt2img(["<lora:ink:0.4>", "<lora:ink:0.5>"], steps=2, progress=False)
    finally:
        model.adapters.lora_dirs.clear()
        model.unload_lora()


def test_weights_come_back_from_the_file_or_from_copies(tiny_single_file, tmp_path) -> None:
    import shutil

    import openldm
    from openldm.adapters.patcher import SourceChangedError

    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_single_file("sd1"), path)
    model = openldm.load(path)
    lora = kohya_lora_for(model, tmp_path / "style.safetensors", seed=9)
    before = _weights(model)
    # Loaded from a file and unchanged: nothing is copied, the file is the way back.
    model.load_lora(lora)
    assert model.adapters.patches.kept_bytes() == 0 and len(model.adapters.patches.changed()) > 20
    model.unload_lora()
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    # A weight changed since loading is copied, and comes back as it was changed.
    with torch.no_grad():
        model.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight.mul_(2)
    edited = _weights(model)
    model.load_lora(lora)
    assert 0 < model.adapters.patches.kept_bytes() < 10**6
    model.unload_lora()
    assert all(torch.equal(edited[k], v) for k, v in _weights(model).items())
    # In half precision, as stored.
    half = openldm.load(path, dtype=torch.float16)
    stored = _weights(half)
    half.load_lora(lora, 0.5)
    assert not all(torch.equal(stored[k], v) for k, v in _weights(half).items())
    half.unload_lora()
    assert all(torch.equal(stored[k], v) for k, v in _weights(half).items())
    # The file replaced while a LoRA is applied: the weights cannot come back from it, and it is said.
    model.load_lora(lora)
    shutil.copy(
        kohya_lora_for(model, tmp_path / "unused.safetensors", seed=1), tmp_path / "unused2.safetensors"
    )
    sd = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, str(path))
    with pytest.raises(SourceChangedError, match="changed on disk"):
        model.unload_lora()


def test_embeddings_dir_and_negative_prompt_words(embedded, tmp_path, capsys) -> None:
    from PIL import Image

    from openldm.images import parse_parameters

    folder = tmp_path / "embeddings"
    folder.mkdir()
    width = embedded.spec.text.width
    safetensors.torch.save_file({"emb_params": torch.randn(2, width)}, str(folder / "glossy.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, width)}}, folder / "bad-shapes.pt")
    (folder / "notes.txt").write_text("not an embedding")
    out = tmp_path / "out"
    argv = ["txt2img", "--outdir", out, *FAST, "--embeddings-dir", folder]
    code, err = _run(
        capsys, *argv, "--prompt", "a glossy red circle", "--negative-prompt", "(bad-shapes:1.3)"
    )
    assert code == 0, err
    params = parse_parameters(Image.open(out / "samples" / "00000.png").info["parameters"])
    used = dict(item.split(": ") for item in params["TI hashes"].split(", "))
    assert set(used) == {"glossy", "bad-shapes"}
