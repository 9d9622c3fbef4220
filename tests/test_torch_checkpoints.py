"""The torch backend's checkpoint state files: optimizer, scheduler and RNG state go through
safetensors + JSON and come back exactly (no pickle)."""

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mlxrl.torch.checkpoints import (  # noqa: E402
    load_optimizer_state,
    rng_state,
    save_optimizer_state,
    set_rng_state,
)


def test_adamw_state_round_trips_and_continues_identically(tmp_path):
    def trained(steps, state=None):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
        if state is not None:
            for p, saved in zip(params, state["params"]):
                p.data.copy_(saved)
            opt.load_state_dict(state["optimizer"])
        for step in range(steps):
            gen = torch.Generator().manual_seed(step + (100 if state else 0))
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params, opt

    params, opt = trained(3)
    save_optimizer_state(opt.state_dict(), tmp_path / "optimizer.safetensors")
    loaded = load_optimizer_state(tmp_path / "optimizer.safetensors")
    assert loaded["param_groups"][0]["betas"] == [0.8, 0.95]
    assert torch.equal(loaded["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])
    resumed, _ = trained(2, {"params": [p.detach().clone() for p in params], "optimizer": loaded})
    straight, _ = trained(2, {"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict()})
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_rng_state_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    tensors, meta = rng_state()
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_file(str(tmp_path / "rng.safetensors")), meta)
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
