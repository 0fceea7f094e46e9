"""Flow-matching scheduler and expert routing against spec §7 and §12 (tables recomputed here from the formula)."""

import math

import pytest
import torch

from mova_train.models import ConfigError, FlowMatchScheduler, expert_for_timestep, get_model_config

SIGMA_MIN = 0.003 / 1.002


def _formula_timesteps(n: int, shift: float = 5.0) -> list[float]:
    """linspace(1, σ_min, n+1) without its last point, shifted: σ = shift·s / (1 + (shift-1)·s); t = 1000·σ."""
    out = []
    for k in range(n):
        s = 1.0 + (SIGMA_MIN - 1.0) * k / n
        out.append(1000.0 * shift * s / (1 + (shift - 1) * s))
    return out


@pytest.fixture(scope="module")
def sched():
    return FlowMatchScheduler.from_config(get_model_config("mova_360p").scheduler)


def test_training_table(sched):
    t = sched.train_timesteps
    assert t.shape == (1000,)
    torch.testing.assert_close(
        t.double(), torch.tensor(_formula_timesteps(1000), dtype=torch.float64), atol=1e-3, rtol=0
    )
    assert t[0].item() == 1000.0
    assert round(t[-1].item(), 2) == 19.64
    assert bool((t[1:] < t[:-1]).all())


def test_sampling_tables_are_subsets_of_the_training_table(sched):
    t50 = sched.sampling_timesteps(50)
    torch.testing.assert_close(t50, sched.train_timesteps[::20], atol=1e-3, rtol=0)
    spec_values = {0: 1000.0, 1: 995.95, 2: 991.76, 18: 899.30, 48: 182.99, 49: 105.04}
    for i, v in spec_values.items():
        assert round(t50[i].item(), 2) == v, i
    torch.testing.assert_close(sched.sampling_timesteps(25), sched.train_timesteps[::40], atol=1e-3, rtol=0)


@pytest.mark.parametrize("steps,high,low,last_high", [(50, 18, 32, 906.98), (25, 9, 16, 914.32)])
def test_sampling_routing_counts(sched, steps, high, low, last_high):
    boundary = sched.boundary_timestep(get_model_config("mova_360p").boundary_ratio)
    assert boundary == 900.0
    experts = [expert_for_timestep(t, boundary) for t in sched.sampling_timesteps(steps).tolist()]
    assert experts == ["video_dit"] * high + ["video_dit_2"] * low
    t = sched.sampling_timesteps(steps)
    assert round(t[high - 1].item(), 2) == last_high
    assert round(t[high].item(), 2) == 899.30


def test_training_index_boundary(sched):
    b = sched.train_boundary_index(900.0)
    assert b / 1000 == 0.359
    assert round(sched.train_timesteps[358].item(), 2) == 900.08
    assert round(sched.train_timesteps[359].item(), 2) == 899.69
    assert sched.expert_index_range("video_dit", 900.0) == (0, 359)
    assert sched.expert_index_range("video_dit_2", 900.0) == (359, 1000)
    no_extra = FlowMatchScheduler(extra_one_step=False)
    assert no_extra.train_boundary_index(900.0) == 358
    g = torch.Generator().manual_seed(0)
    hi = sched.sample_training_timesteps("video_dit", 512, 900.0, generator=g)
    lo = sched.sample_training_timesteps("video_dit_2", 512, 900.0, generator=g)
    assert bool((hi >= 900.0).all()) and bool((lo < 900.0).all())
    assert set(hi.tolist()) <= set(sched.train_timesteps.tolist())
    assert expert_for_timestep(hi, 900.0) == "video_dit" and expert_for_timestep(lo, 900.0) == "video_dit_2"


def test_routing_rule_edges():
    assert expert_for_timestep(900.0) == "video_dit"
    assert expert_for_timestep(899.99) == "video_dit_2"
    with pytest.raises(ValueError, match="straddle"):
        expert_for_timestep(torch.tensor([950.0, 300.0]))


def test_sigma_lookup_snaps_to_the_training_grid(sched):
    grid = sched.train_timesteps
    # Halfway-ish between two grid points snaps to the nearer one.
    t = grid[100] * 0.7 + grid[101] * 0.3
    assert sched.sigma_for(t).item() == pytest.approx(grid[100].item() / 1000, abs=1e-7)
    assert sched.sigma_for(torch.tensor([1000.0, 19.0])).tolist() == pytest.approx(
        [1.0, grid[-1].item() / 1000]
    )


def test_add_noise_target_and_step(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, generator=g)
    noise = torch.randn(2, 3, 4, generator=g)
    t = sched.train_timesteps[torch.tensor([10, 500])]
    sigma = (t / 1000).view(2, 1, 1)
    xt = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(xt, (1 - sigma) * x0 + sigma * noise)
    v = sched.target(x0, noise)
    torch.testing.assert_close(v, noise - x0)
    # An exact velocity carries x_t to x_s along the straight path, and the last step (t_to=None) lands on x0.
    t_to = sched.train_timesteps[torch.tensor([20, 600])]
    torch.testing.assert_close(sched.step(v, t, t_to, xt), sched.add_noise(x0, noise, t_to))
    torch.testing.assert_close(sched.step(v, t, None, xt), x0)


def test_from_config_validates():
    with pytest.raises(ConfigError, match="shift_terminal"):
        FlowMatchScheduler.from_config({"shift": 5.0, "shift_terminal": 0.5})
    assert FlowMatchScheduler.from_config({"shift": 3.0, "extra_one_step": True}).shift == 3.0
    assert math.isclose(FlowMatchScheduler().sigma_min, SIGMA_MIN)


def _numpy_float32_recipe(n: int, shift: float = 5.0, extra_one_step: bool = True):
    """The reference recipe recomputed with numpy in float32 (independent of the scheduler's code): torch's
    linspace (float32 step; first half up from the start, second half down from the end, each value
    start + step·i rounded once, as the fused multiply-add of the GPU kernel), the shift and ×1000 in float32."""
    import numpy as np

    f32 = np.float32
    points = n + 1 if extra_one_step else n
    start, end = f32(SIGMA_MIN + (1.0 - SIGMA_MIN) * 1.0), f32(SIGMA_MIN)
    step = (end - start) / f32(points - 1)
    i = np.arange(points, dtype=np.int64)
    up = (np.float64(start) + np.float64(step) * i).astype(f32)  # exact in float64, rounded once
    down = (np.float64(end) - np.float64(step) * (points - 1 - i)).astype(f32)
    s = np.where(i < points // 2, up, down).astype(f32)
    if extra_one_step:
        s = s[:-1]
    sigma = (f32(shift) * s) / (f32(1) + f32(shift - 1) * s)
    assert sigma.dtype == np.float32
    return sigma, (sigma * f32(1000)).astype(f32)


@pytest.mark.parametrize("n", [1000, 50, 25, 7])
def test_grid_equals_the_float32_recipe_bit_for_bit(sched, n):
    import numpy as np

    sigma, timesteps = _numpy_float32_recipe(n)
    ours = sched.train_timesteps if n == 1000 else sched.sampling_timesteps(n)
    assert ours.dtype == torch.float32
    assert ours.numpy().tobytes() == timesteps.tobytes()
    if n == 1000:
        assert sched.train_sigmas.numpy().tobytes() == sigma.tobytes()
    looked_up = sched.sigma_for(torch.from_numpy(timesteps))
    if 1000 % n == 0:  # on the training table: every σ lookup returns the recipe's float32 σ exactly
        assert looked_up.numpy().tobytes() == sigma.tobytes()
    else:  # off the table (7 steps): σ snaps to the nearest training entry, as the reference does
        table_sigma, table_t = _numpy_float32_recipe(1000)
        nearest = np.abs(table_t[None, :] - timesteps[:, None]).argmin(axis=1)
        assert looked_up.numpy().tobytes() == table_sigma[nearest].tobytes()
        assert looked_up.numpy().tobytes() != sigma.tobytes()


def test_float64_grid_cast_afterwards_differs_from_the_recipe():
    """What the float32 recipe guards against: the same grid built in float64 and cast at the end differs by 1-2
    ulp in hundreds of training timesteps (the test above would catch a return to it)."""
    import numpy as np

    _, timesteps = _numpy_float32_recipe(1000)
    f64 = np.array(_formula_timesteps(1000), dtype=np.float64).astype(np.float32)
    differ = timesteps != f64
    assert 100 < int(differ.sum()) < 1000
    ulps = np.abs(timesteps.view(np.int32) - f64.view(np.int32))
    assert int(ulps.max()) <= 2
