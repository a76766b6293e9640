"""Networks: the literature's exact architectures (parameter counts from the layer formulas)."""
import torch

from semiseg.networks import build_network, count_parameters


def conv(cin, cout, k, d=2):
    return cin * cout * k ** d + cout


def bn(c):
    return 2 * c


def unet_count(upsampling):
    ch, total = [16, 32, 64, 128, 256], 0
    cin = 1
    for c in ch:  # encoder ConvBlocks
        total += conv(cin, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
        cin = c
    for i in range(4, 0, -1):
        cup, cskip = ch[i], ch[i - 1]
        total += conv(cup, cskip, 1) if upsampling == "bilinear" else cup * cskip * 4 + cskip
        total += conv(2 * cskip, cskip, 3) + bn(cskip) + conv(cskip, cskip, 3) + bn(cskip)
    return total + conv(16, 4, 3)


def test_unet_parameter_counts_match_the_architecture():
    b = build_network("unet", num_classes=4, upsampling="bilinear")
    a = build_network("unet", num_classes=4, upsampling="transpose")
    assert count_parameters(b) == unet_count("bilinear") == 1_813_764  # "about 1.8 M" (SSL4MIS UNet)
    assert count_parameters(a) == unet_count("transpose") == 1_944_324


def test_vnet_parameter_count_is_9_44_million():
    assert count_parameters(build_network("vnet", num_classes=2)) == 9_448_866


def test_unet_features_and_shapes():
    net = build_network("unet", num_classes=4).eval()
    logits, f = net(torch.randn(2, 1, 64, 48), return_features=True)
    assert logits.shape == (2, 4, 64, 48)
    assert [t.shape[1] for t in f.encoder] == [16, 32, 64, 128, 256]
    assert [t.shape[1] for t in f.decoder] == [128, 64, 32, 16]
    assert f.embedding.shape == (2, 16, 64, 48)
    # decode(encode(x)) is the forward pass
    assert torch.equal(net.decode(net.encode(torch.ones(1, 1, 32, 32)))[0], net(torch.ones(1, 1, 32, 32)))


def test_vnet_dropout_only_in_training():
    torch.manual_seed(0)
    net = build_network("vnet", num_classes=2)
    x = torch.randn(1, 1, 32, 32, 16)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))  # Dropout3d(0.5) on x5 and x9
    logits, f = net(x, return_features=True)
    assert f.embedding.shape == (1, 16, 32, 32, 16) and logits.shape == (1, 2, 32, 32, 16)


REFERENCE_2D_METHODS = ("supervised", "mean_teacher", "ua_mt", "fixmatch", "unimatch", "agp", "icl", "icl_lite",
                        "ss_net", "lcc")


def test_each_reference_2d_method_defaults_to_the_bilinear_unet_of_its_reference():
    """SSL4MIS's Decoder never selects the transposed branch of UpBlock; UniMatch, AIGC-Match, ICL and SS-Net
    copy it: every 2D reference trains the 1,813,764-parameter network at 4 classes, on every 2D preset."""
    from semiseg.config import resolve_config
    for method in REFERENCE_2D_METHODS:
        for preset in ("acdc", "phantom", "generic2d"):
            cfg = resolve_config({"method": method, "preset": preset, "data": "phantom"})
            net = build_network(cfg.network, num_classes=4, upsampling=cfg.upsampling)
            assert (method, preset, count_parameters(net)) == (method, preset, 1_813_764)
    # the transposed variant stays available
    cfg = resolve_config({"method": "agp", "preset": "acdc", "data": "phantom", "upsampling": "transpose"})
    assert count_parameters(build_network("unet", num_classes=4, upsampling=cfg.upsampling)) == 1_944_324
