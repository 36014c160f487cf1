import pytest
import torch
import torch_pruning as tp
from pruning_helpers import random_prune
from torch import nn

import networks
from networks import CheckpointError, load_network, save_network

X32 = torch.randn(2, 3, 32, 32)


def test_resnet56_parameters_and_macs_match_depgraph_layout():
    model = networks.build("resnet56_cifar", 10)
    macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 855_770
    assert params == 855_770
    assert macs == 127_115_914


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_cifar_resnet_depths_have_6n_plus_2_layers(depth):
    model = networks.build(f"resnet{depth}_cifar", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # 3x3 convs + the classifier
    assert model(X32).shape == (2, 10)


def test_width_multiplier_scales_channels():
    model = networks.build("resnet20_cifar", 10, width=0.5)
    assert [model.conv1.out_channels, model.layer2[0].conv1.out_channels, model.fc.in_features] \
        == [8, 16, 32]


def test_vgg19_layout():
    model = networks.build("vgg19_bn_cifar", 100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and model.classifier.in_features == 512
    assert model(X32).shape == (2, 100)


def test_torchvision_models_by_name_without_download():
    model = networks.build("mobilenet_v2", 7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="never downloaded"):
        networks.build("resnet18", 10, weights="DEFAULT")


def test_unknown_name_lists_the_alternatives():
    with pytest.raises(ValueError, match="resnet56_cifar"):
        networks.build("resnet57", 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        networks.build("resnet21_cifar", 10)


def test_classifier_found_by_identity_not_width():
    model = networks.build("resnet20_cifar", 16)  # the last stage is 64 wide, classes 16
    assert networks.classifier_layer(model, X32) is model.fc


def _pruned_resnet56():
    model = networks.build("resnet56_cifar", 10)
    base, _ = tp.utils.count_ops_and_params(model, X32[:1])
    random_prune(model, X32[:1], ratio=0.3, seed=0)
    model.eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    macs, _ = tp.utils.count_ops_and_params(model, X32[:1])
    return model, base / macs


def test_pruned_checkpoint_round_trip_is_bit_exact(tmp_path):
    model, speed_up = _pruned_resnet56()
    assert 1.7 < speed_up < 2.6
    arch = {"name": "resnet56_cifar", "num_classes": 10, "kwargs": {}}
    path = save_network(model, tmp_path / "net.pt", arch, metadata={"speed_up": speed_up})
    record = torch.load(path, weights_only=True)  # plain tensors and Python values only
    assert record["metadata"]["speed_up"] == speed_up
    loaded, _ = load_network(path)
    loaded.eval()
    assert torch.equal(loaded(X32), model(X32))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_depthwise_pruned_checkpoint_round_trip(tmp_path):
    model = networks.build("mobilenet_v2", 10, width_mult=0.35)
    example = torch.randn(1, 3, 64, 64)
    random_prune(model, example, ratio=0.3, seed=1)
    model.eval()
    path = save_network(model, tmp_path / "mb.pt", {"name": "mobilenet_v2", "num_classes": 10,
                                                   "kwargs": {"width_mult": 0.35}})
    loaded, _ = load_network(path)
    loaded.eval()
    assert torch.equal(loaded(example), model(example))


def test_a_pruned_vision_transformer_runs_and_round_trips_through_a_file(tmp_path):
    arch = {"name": "vit_cifar", "num_classes": 10,
            "kwargs": {"num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}}
    model = networks.build(arch["name"], 10, **arch["kwargs"])
    base = networks.count_macs(model, X32[:1])
    speed_up = networks.prune_to_speed_up(model, X32[:1], 1.5, base, iterative_steps=20)
    assert speed_up >= 1.5 and base / networks.count_macs(model, X32[:1]) == speed_up
    width = model.conv_proj.out_channels  # the residual width: pruned, a multiple of the heads
    assert width < 16 and width % 2 == 0
    attention = model.encoder.layers[0].self_attention
    assert (model.hidden_dim, attention.embed_dim, attention.head_dim) == (width, width, width // 2)
    model.eval()
    path = save_network(model, tmp_path / "vit.pt", arch)
    loaded, _ = load_network(path)
    loaded.eval()
    assert torch.equal(loaded(X32), model(X32))
    assert loaded.encoder.layers[1].ln_2.normalized_shape == (width,)


def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path):
    model = networks.build("resnet20_cifar", 10, width=0.25)
    path = save_network(model, tmp_path / "net.pt", {"name": "resnet20_cifar", "num_classes": 10,
                                                    "kwargs": {"width": 0.25}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"truncated.pt' is truncated \(500 bytes"):
        load_network(truncated)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": model.state_dict()}, other)
    with pytest.raises(CheckpointError, match="not a target-network file"):
        load_network(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_network(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("hello world")
    with pytest.raises(CheckpointError, match=r"notes.txt' is not a file saved by torch.save "
                                              r"\(it begins with b'hello wo'\)"):
        load_network(tmp_path / "notes.txt")
    record = torch.load(path, weights_only=True)
    record["state_dict"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(record, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="conv1.weight.*NaN"):
        load_network(tmp_path / "nan.pt")


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "metaprune.network/v1", "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled code"):
        load_network(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model = networks.build("resnet20_cifar", 10, width=0.25)
    arch = {"name": "resnet20_cifar", "num_classes": 10, "kwargs": {"width": 0.25}}
    path = save_network(model, tmp_path / "net.pt", arch)
    before = path.read_bytes()

    def broken_save(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_network(model, path, arch)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]


@pytest.mark.parametrize("name,kwargs", [("convnext_tiny", {}), ("efficientnet_b0", {}),
                                         ("mobilenet_v3_small", {"width_mult": 0.25})])
def test_pruned_modern_cnns_round_trip_through_a_file(name, kwargs, tmp_path):
    """Layer scales, LayerNorm2d and squeeze-excitation survive pruning and a network file:
    the rebuilt network computes the same outputs bit for bit. (ShuffleNet is not here:
    torch_pruning's index mapping of its channel shuffle divides by zero during magnitude
    pruning, plain loop included.)"""
    model = networks.build(name, 10, **kwargs)
    base = networks.count_macs(model, X32[:1])
    networks.prune_to_speed_up(model, X32[:1], 1.3, base, iterative_steps=20)
    model.eval()
    path = save_network(model, tmp_path / "net.pt", {"name": name, "num_classes": 10, "kwargs": kwargs})
    loaded, _ = load_network(path)
    loaded.eval()
    assert torch.equal(loaded(X32), model(X32))


def test_a_vision_transformer_curve_prunes_step_by_step_to_its_end():
    """Every pruned point of a ViT's curve runs (its hidden_dim follows each step)."""
    model = networks.build("vit_cifar", 10, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    base = networks.count_macs(model, X32[:1])
    widths = []

    def evaluate(pruned):
        widths.append(pruned.hidden_dim)
        return float(pruned(X32).softmax(1)[:, 0].mean())

    points = networks.accuracy_curve(model, X32[:1], base, evaluate, max_speed_up=1.8,
                                     iterative_steps=20)
    assert points[-1][0] >= 1.8 and len(points) == len(widths) >= 3
    assert widths[0] == 16 and widths[-1] < 16 and model.hidden_dim == 16  # a copy was pruned
