import argparse

import pytest
import torch

import model as M


@pytest.mark.parametrize("patch,size", [(16, (224, 224)), (8, (64, 96)), (16, (48, 80))])
def test_vit_shapes_at_square_and_non_square_sizes(patch, size):
    vit = M.vit_tiny(patch)
    x = torch.randn(2, 3, *size)
    h, w = size[0] // patch, size[1] // patch
    f = vit.forward_features(x, which="k")
    assert f.cls.shape == (2, 192) and f.patch.shape == (2, h * w, 192) and f.grid == (h, w)
    assert f.tokens.shape == (2, 3, 1 + h * w, 64)
    assert vit.forward_features(x, which="last").tokens.shape == (2, 1, 1 + h * w, 192)
    assert vit.forward_features(x).tokens is None
    assert vit.get_last_selfattention(x).shape == (2, 3, 1 + h * w, 1 + h * w)
    assert M.dense_features(vit, x, n_last_blocks=2).shape == (2, 2 * 192, h, w)


def test_vit_rejects_input_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch"):
        M.vit_tiny(16)(torch.randn(1, 3, 50, 64))


def test_forward_features_exposes_last_block_qkv_and_final_tokens_in_one_pass():
    torch.manual_seed(0)
    vit = M.vit_tiny(16).eval()
    x = torch.randn(2, 3, 32, 48)
    feats = {w: vit.forward_features(x, which=w) for w in ("q", "k", "v", "last")}
    # recompute the last block's input independently and project it
    t = vit.prepare_tokens(x)
    for blk in vit.blocks[:-1]:
        t, _ = blk(t)
    q, k, v = vit.blocks[-1].attn.qkv_heads(vit.blocks[-1].norm1(t))
    for name, ref in zip("qkv", (q, k, v)):
        torch.testing.assert_close(feats[name].tokens, ref)
    final = vit.get_intermediate_layers(x, 1)[0]
    torch.testing.assert_close(feats["last"].tokens[:, 0], final)
    torch.testing.assert_close(feats["k"].patch, final[:, 1:])
    torch.testing.assert_close(feats["k"].cls, vit(x))


def test_last_selfattention_matches_the_attention_used_in_the_forward_pass():
    torch.manual_seed(0)
    vit = M.vit_tiny(16).eval()
    x = torch.randn(1, 3, 32, 32)
    attn = vit.get_last_selfattention(x)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    v = vit.forward_features(x, which="v").tokens
    t = vit.prepare_tokens(x)
    for blk in vit.blocks[:-1]:
        t, _ = blk(t)
    _, (_, _, _) = vit.blocks[-1].attn(vit.blocks[-1].norm1(t))
    q, k, _ = vit.blocks[-1].attn.qkv_heads(vit.blocks[-1].norm1(t))
    torch.testing.assert_close(attn @ v, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_positional_embedding_is_unchanged_at_224_and_resized_for_other_grids():
    vit = M.vit_tiny(16)
    assert vit.interpolate_pos_encoding(14, 14) is vit.pos_embed
    assert vit.interpolate_pos_encoding(3, 5).shape == (1, 16, 192)


def test_head_parameter_names_match_dino_and_croc():
    head = M.CrOCHead(192, out_dim=64, out_dim_c=32)
    assert set(head.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                      "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v",
                                      "last_layer_c.weight_g", "last_layer_c.weight_v"}
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer
    x = torch.randn(5, 192)
    assert head(x).shape == (5, 64) and head(x, centroids=True).shape == (5, 32)


def test_backbone_parameter_names_match_dino_and_timm():
    keys = set(M.vit_tiny(16).state_dict())
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.qkv.bias", "blocks.11.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.bias", "norm.weight"]:
        assert k in keys, k


def _official_croc_checkpoint(path, arch="vit_tiny", patch=16, new_weight_norm_api=False):
    """A checkpoint in the official CrOC layout: DDP-prefixed student, `backbone.`/`head.` prefixes, old
    weight-norm keys, an argparse.Namespace under `args`, plus optimizer and loss states."""
    torch.manual_seed(1)
    student = M.CrOCModel(M.build_vit(arch, patch), M.CrOCHead(192, 64, 32))
    teacher = M.CrOCModel(M.build_vit(arch, patch), M.CrOCHead(192, 64, 32))
    def fmt(sd, prefix):
        out = {}
        for k, v in sd.items():
            if new_weight_norm_api:
                k = k.replace(".weight_g", ".parametrizations.weight.original0")
                k = k.replace(".weight_v", ".parametrizations.weight.original1")
            out[prefix + k] = v
        return out
    opt = torch.optim.AdamW(student.parameters())
    torch.save({"student": fmt(student.state_dict(), "module."), "teacher": fmt(teacher.state_dict(), ""),
                "optimizer": opt.state_dict(), "epoch": 7, "croc_loss": {"center": torch.zeros(1, 64)},
                "args": argparse.Namespace(arch=arch, patch_size=patch, lr=5e-4, global_crops_scale=(0.25, 1.0))},
               path)
    return student, teacher


@pytest.mark.parametrize("new_api", [False, True])
def test_load_pretrained_reads_official_croc_checkpoint_and_reproduces_outputs(tmp_path, new_api):
    path = tmp_path / "croc.pth"
    student, teacher = _official_croc_checkpoint(path, new_weight_norm_api=new_api)
    x = torch.randn(2, 3, 32, 32)
    for key, src in (("teacher", teacher), ("student", student)):
        vit = M.vit_tiny(16)
        res = M.load_pretrained(vit, str(path), key=key)
        assert res == {"missing": [], "unexpected": []}
        src.eval(), vit.eval()
        torch.testing.assert_close(vit(x), src.backbone(x))
        full = M.CrOCModel(M.vit_tiny(16), M.CrOCHead(192, 64, 32)).eval()
        assert M.load_pretrained(full, str(path), key=key) == {"missing": [], "unexpected": []}
        torch.testing.assert_close(full.head(full.backbone(x), centroids=True),
                                   src.head(src.backbone(x), centroids=True))


def test_load_pretrained_reads_bare_backbone_weights(tmp_path):
    src = M.vit_tiny(8).eval()
    torch.save(src.state_dict(), tmp_path / "dino_deitsmall8.pth")
    vit = M.vit_tiny(8).eval()
    assert M.load_pretrained(vit, str(tmp_path / "dino_deitsmall8.pth")) == {"missing": [], "unexpected": []}
    x = torch.randn(1, 3, 16, 24)
    torch.testing.assert_close(vit(x), src(x))
    full = M.CrOCModel(M.vit_tiny(8), M.CrOCHead(192, 64, 32))
    res = M.load_pretrained(full, str(tmp_path / "dino_deitsmall8.pth"))
    assert res["unexpected"] == [] and all(k.startswith("head.") for k in res["missing"])


def test_load_pretrained_shape_mismatch_names_key_and_shapes(tmp_path):
    torch.save(M.vit_tiny(16).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 197, 192\), model \(1, 785, 192\)"):
        M.load_pretrained(M.vit_tiny(8), str(tmp_path / "w.pth"))


def test_load_pretrained_names_missing_file_and_missing_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        M.load_pretrained(M.vit_tiny(16), str(tmp_path / "nope.pth"))
    _official_croc_checkpoint(tmp_path / "c.pth")
    with pytest.raises(KeyError, match=r"'ema'.*\['student', 'teacher'"):
        M.load_pretrained(M.vit_tiny(16), str(tmp_path / "c.pth"), key="ema")


class _Evil:
    def __reduce__(self):
        return (print, ("this would have run arbitrary code",))


def test_load_pretrained_refuses_checkpoints_that_execute_code(tmp_path):
    torch.save({"teacher": M.vit_tiny(16).state_dict(), "payload": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(RuntimeError, match="weights_only=True"):
        M.load_pretrained(M.vit_tiny(16), str(tmp_path / "evil.pth"))


def test_load_backbone_is_frozen_and_in_eval_mode(tmp_path):
    torch.save(M.vit_tiny(16).state_dict(), tmp_path / "w.pth")
    vit = M.load_backbone("vit_tiny", 16, str(tmp_path / "w.pth"))
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    with pytest.raises(ValueError, match="--arch"):
        M.load_backbone("vit_huge", 16)
