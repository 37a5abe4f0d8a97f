"""Union ControlNets (xinsir's controlnet-union-sdxl): parity with diffusers' ControlNetUnionModel on identical random
weights through our key map, from the diffusers and original layouts; the control type changes the residuals;
"auto"; bad types and broken files give clear errors."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.controlnets.controlnet_union import ControlNetUnionModel

from diffusion.checkpoints.controlnet_files import (
    controlnet_info,
    controlnet_state_dict,
    load_controlnet,
    write_controlnet_file,
)
from diffusion.checkpoints.files import CheckpointError
from diffusion.models.controlnet_union import UNION_TYPES, UnionConfig, UnionControlNet
from tests.diffusion.random_weights import randomize_, relative_error
from tests.diffusion.test_controlnet import controlnet_inputs, heads_metadata, write_tensors
from tests.diffusion.test_unet import TINY, diffusers_config

TOLERANCE = 1e-4


def diffusers_union(types: int = 8, layers: int = 1, seed: int = 0) -> ControlNetUnionModel:
    config = diffusers_config(TINY["sdxl"])
    for key in ("up_block_types", "out_channels"):
        config.pop(key)
    width = TINY["sdxl"].model_channels
    config.update(num_control_type=types, num_trans_channel=width, num_trans_head=2, num_trans_layer=layers,
                  num_proj_channel=width, conditioning_embedding_out_channels=(16, 32, 96, 256))
    return randomize_(ControlNetUnionModel(**config), seed).eval()


def union_file(tmp_path, theirs: ControlNetUnionModel, layout: str = "diffusers"):
    path = tmp_path / f"union-{layout}.safetensors"
    if layout == "diffusers":
        write_tensors(path, theirs.state_dict(), heads_metadata("sdxl"))
    else:  # through our reader's names, written back in the original layout by our writer
        diffusers_path = union_file(tmp_path, theirs)
        net, info = load_controlnet(diffusers_path, dtype=torch.float32)
        write_controlnet_file(path, net.state_dict(), info, layout="original", prefix=True)
    return path


def reference(theirs: ControlNetUnionModel, x, hint, t, context, added, control_type: int, types: int):
    one_hot = torch.zeros(x.shape[0], types)
    one_hot[:, control_type] = 1.0
    return theirs(x, t, context, [hint], control_type=one_hot, control_type_idx=[control_type],
                  added_cond_kwargs=added, return_dict=False)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@torch.no_grad()
def test_residuals_match_diffusers_for_every_type(tmp_path, layout: str) -> None:
    theirs = diffusers_union(types=8, layers=2)
    ours, info = load_controlnet(union_file(tmp_path, theirs, layout), dtype=torch.float32)
    assert isinstance(ours, UnionControlNet)
    assert info.family == "sdxl" and info.union == UnionConfig(8, 32, 2, 8)
    x, hint, t, context, y, added = controlnet_inputs("sdxl", batch=1)
    outputs = []
    for control_type in range(8):
        down, mid = reference(theirs, x, hint, t, context, added, control_type, 8)
        residuals = ours(x, hint, t, context, y, control_type=control_type)
        assert len(residuals) == len(down) + 1
        for mine, ref in zip(residuals, [*down, mid], strict=True):
            assert relative_error(mine, ref) < TOLERANCE, UNION_TYPES[control_type]
        outputs.append(residuals[0])
    # the type matters: each type's residuals differ from the first type's
    assert all(relative_error(o, outputs[0]) > 1e-3 for o in outputs[1:])


@torch.no_grad()
def test_cfg_batch_of_identical_rows_matches_diffusers_and_rows_are_independent(tmp_path) -> None:
    """The reference attends across the batch; with identical rows (a CFG batch: same latent, same hint) that is
    each row alone, which is what we compute for any batch."""
    theirs = diffusers_union(types=6)
    ours, _ = load_controlnet(union_file(tmp_path, theirs), dtype=torch.float32)
    x, hint, t, context, y, added = controlnet_inputs("sdxl", batch=1)
    two = [v.expand(2, *v.shape[1:]) for v in (x, hint, context, y)]
    added2 = {k: v.expand(2, *v.shape[1:]) for k, v in added.items()}
    t2 = t.expand(2)
    down, mid = reference(theirs, two[0], two[1], t2, two[2], added2, 3, 6)
    residuals = ours(two[0], two[1], t2, two[2], two[3], control_type=3)
    for mine, ref in zip(residuals, [*down, mid], strict=True):
        assert relative_error(mine, ref) < TOLERANCE
    # a different second row leaves the first row's residuals as they were alone
    other = [torch.cat([v, torch.rand_like(v)]) for v in (x, hint)]
    mixed = ours(other[0], other[1], t2, two[2], two[3], control_type=3)
    alone = ours(x, hint, t, context, y, control_type=3)
    assert all(relative_error(m[:1], a) < 1e-5 for m, a in zip(mixed, alone, strict=True))


@torch.no_grad()
def test_auto_encodes_the_hint_without_a_task_token(tmp_path) -> None:
    theirs = diffusers_union(types=6)
    ours, _ = load_controlnet(union_file(tmp_path, theirs), dtype=torch.float32)
    x, hint, t, context, y, _ = controlnet_inputs("sdxl", batch=1)
    auto = ours(x, hint, t, context, y)
    typed = ours(x, hint, t, context, y, control_type=0)
    assert relative_error(auto[0], typed[0]) > 1e-3
    # auto = the plain ControlNet path with an all-zero type vector added to the time embedding
    emb_zero = ours.control_add_embedding(torch.zeros(1, 6), torch.float32)
    assert torch.count_nonzero(emb_zero) > 0
    encoded = ours.input_hint_block(hint)
    assert torch.allclose(ours.guided_hint(hint, x), encoded)


def test_a_type_the_file_does_not_know_is_refused(tmp_path) -> None:
    theirs = diffusers_union(types=6)  # controlnet-union-sdxl-1.0: no tile, no repaint
    ours, _ = load_controlnet(union_file(tmp_path, theirs), dtype=torch.float32)
    x, hint, t, context, y, _ = controlnet_inputs("sdxl", batch=1)
    with pytest.raises(ValueError, match=r"knows 6 control types.*not 'tile'"):
        ours(x, hint, t, context, y, control_type=UNION_TYPES.index("tile"))
    with pytest.raises(ValueError, match="control_type only"):
        ours(x, hint, t, context, y, strength=2)


def test_plain_controlnet_refuses_options() -> None:
    from diffusion.models.controlnet import ControlNet, ControlNetConfig

    net = ControlNet(ControlNetConfig(TINY["sdxl"]))
    with pytest.raises(ValueError, match="takes no options"):
        net.check_options({"control_type": 1})


def test_broken_union_file_names_the_problem(tmp_path) -> None:
    sd = diffusers_union(types=6).state_dict()
    sd["control_add_embedding.linear_1.weight"] = sd["control_add_embedding.linear_1.weight"][:, :-1]
    ours, _, _ = controlnet_state_dict(sd)
    with pytest.raises(CheckpointError, match=r"union ControlNet cannot be read.*not a multiple"):
        controlnet_info(ours, "diffusers", False, heads_metadata("sdxl"))
    sd = diffusers_union(types=6).state_dict()
    del sd["spatial_ch_projs.weight"]
    path = tmp_path / "missing.safetensors"
    write_tensors(path, sd, heads_metadata("sdxl"))
    with pytest.raises(CheckpointError, match=r"spatial_ch_projs\.weight"):
        load_controlnet(path)



@pytest.mark.parametrize("types", [6, 8])
def test_real_size_keys_shapes_and_config(types: int) -> None:
    """At real size (on meta, xinsir's configuration): diffusers' ControlNetUnionModel through our reader has exactly
    the keys and shapes of our UnionControlNet, read back as SDXL with the file's number of types and 256-wide type
    embeddings."""
    from diffusion.checkpoints.controlnet_files import controlnet_info
    from diffusion.models.controlnet import ControlNetConfig
    from diffusion.models.unet import UNetConfig

    config = ControlNetConfig(UNetConfig.sdxl())
    dcfg = diffusers_config(config.unet)
    for key in ("up_block_types", "out_channels"):
        dcfg.pop(key)
    dcfg.update(num_control_type=types, conditioning_embedding_out_channels=(16, 32, 96, 256))
    with torch.device("meta"):
        theirs, layout, _ = controlnet_state_dict(ControlNetUnionModel(**dcfg).state_dict())
        info = controlnet_info(theirs, layout, False)
        ours = UnionControlNet(config, UnionConfig(types, 320, 1, 256)).state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert (info.family, info.config, info.union) == ("sdxl", config, UnionConfig(types, 320, 1, 256))
