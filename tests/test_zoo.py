"""Proxy zoo: proxy names everywhere, train-once caching keyed by recipe, local weights, hub weights offline."""
import time

import pytest
import torch
from huggingface_hub import constants

import evit.zoo as zoo
from evit.models import PROXY_MODELS, UnknownModelError, create_model
from evit.builder.io import CheckpointError, read_checkpoint
from evit.train import fit
from evit.zoo import PROXY_RECIPES, WeightsUnavailableError, load_model, main

# Tiny stand-in for deit_proxy's recipe: the real one trains for minutes on Fashion-MNIST.
TINY_RECIPE = dict(data="digits", img_size=28, epochs=1, batch_size=64, lr=1e-3, limit_train=128, limit_val=64)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVIT_CACHE", str(tmp_path / "zoo"))
    return tmp_path / "zoo"


@pytest.mark.parametrize("name", sorted(PROXY_MODELS))
def test_proxy_builds_at_its_recipe_size(name):
    size = PROXY_RECIPES[name]["img_size"]
    model = create_model(name).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_proxy_trains_once_then_loads_from_cache(cache, monkeypatch):
    monkeypatch.setitem(PROXY_RECIPES, "deit_proxy", TINY_RECIPE)
    first = load_model("deit_proxy")
    assert not first.training
    (trained,) = cache.iterdir()
    assert trained.name.startswith("deit_proxy-") and (trained / "metrics.csv").is_file()

    monkeypatch.setattr(zoo, "fit", lambda cfg: pytest.fail("a cached proxy must not be trained again"))
    second = load_model("deit_proxy")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    random = load_model("deit_proxy", weights="random")
    assert not torch.equal(random.head.weight, first.head.weight)


def test_changed_recipe_gets_a_new_cache_entry(cache, monkeypatch):
    monkeypatch.setitem(PROXY_RECIPES, "deit_proxy", TINY_RECIPE)
    key = zoo.proxy_dir("deit_proxy")
    monkeypatch.setitem(PROXY_RECIPES, "deit_proxy", dict(TINY_RECIPE, lr=2e-3))
    assert zoo.proxy_dir("deit_proxy") != key
    monkeypatch.setitem(PROXY_RECIPES, "deit_proxy", TINY_RECIPE)
    assert zoo.proxy_dir("deit_proxy") == key and key.parent == cache


def test_quick_budget_trains_its_own_entry(cache, monkeypatch):
    monkeypatch.setitem(PROXY_RECIPES, "deit_proxy", TINY_RECIPE)
    monkeypatch.setitem(zoo.PROXY_BUDGETS, "quick-proxy", dict(limit_train=64))
    trained, real_fit = [], zoo.fit
    monkeypatch.setattr(zoo, "fit", lambda cfg: trained.append(cfg) or real_fit(cfg))
    load_model("deit_proxy", weights="quick-proxy")
    assert [cfg.limit_train for cfg in trained] == [64]
    assert (zoo.proxy_dir("deit_proxy", "quick-proxy") / "model.pth").is_file()
    assert not zoo.proxy_dir("deit_proxy").exists()  # the standard recipe is a different entry, not trained
    with pytest.raises(ValueError, match="valid: proxy, quick-proxy"):
        zoo.proxy_config("deit_proxy", "fast")


@pytest.mark.parametrize("model, model_kwargs", [
    ("deit_proxy", {}),
    ("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)),  # rebuilt from model.pth
])
def test_weights_from_local_file(tmp_path, model, model_kwargs):
    fit(dict(TINY_RECIPE, img_size=8, model=model, model_kwargs=model_kwargs, out=str(tmp_path)))
    saved = read_checkpoint(tmp_path / "model.pth")["state_dict"]
    loaded = load_model(model, weights=str(tmp_path / "model.pth"))
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    # A training checkpoint holds no build kwargs: pass them.
    from_ckpt = load_model(model, weights=str(tmp_path / "last.pth"), img_size=8, num_classes=10, **model_kwargs)
    assert all(torch.equal(saved[k], v) for k, v in from_ckpt.state_dict().items())


def test_local_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth"):
        load_model("deit_proxy", weights=str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model("deit_proxy", weights=str(corrupt))
    torch.save(create_model("deit_proxy", embed_dim=48).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model("deit_proxy", weights=str(tmp_path / "narrow.pth"))


def test_unknown_names():
    with pytest.raises(UnknownModelError, match="deit_proxy"):
        load_model("deit_proxxy", weights="random")
    with pytest.raises(WeightsUnavailableError, match="no proxy recipe"):
        load_model("resnet18", weights="proxy")


def test_pretrained_unreachable_fails_fast_with_one_line(tmp_path, monkeypatch):
    # An endpoint that refuses connections and an empty cache: the same answer with or without internet.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        load_model("deit_tiny", weights="pretrained")
    assert time.perf_counter() - start < 10  # huggingface_hub alone retries for ~45 s
    message = str(err.value)
    assert "unreachable" in message and "weights='/path/to/weights.pth'" in message and "\n" not in message
    with pytest.raises(WeightsUnavailableError, match="weights='proxy'"):
        load_model("deit_proxy", weights="pretrained")


def test_cli_lists_proxies(cache, capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert all(name in out for name in PROXY_RECIPES) and "not trained" in out


@pytest.mark.parametrize("name,takes", [("deit_tiny", True), ("swin_proxy", True), ("levit_128s", True),
                                        ("evit_m0", True), ("resnet18", False), ("convnext_atto", False)])
def test_img_size_goes_to_the_models_whose_constructor_takes_one(name, takes):
    """Read from the constructor (LeViT's through **kwargs, evit's as a config field), so a CNN gets no argument it
    would reject and a token-grid model is really built at the size asked for."""
    from evit.models import takes_img_size

    def shapes(model):
        return {k: v.shape for k, v in [*model.named_parameters(), *model.named_buffers()]}

    assert takes_img_size(name) is takes
    model = create_model(name, img_size=64, num_classes=3).eval()
    assert (shapes(model) != shapes(create_model(name, num_classes=3))) is takes  # pos embeds, biases, masks
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_a_constructor_error_other_than_the_size_is_raised_not_retried():
    with pytest.raises(TypeError, match="no_such_argument"):
        create_model("resnet18", img_size=64, no_such_argument=1)
