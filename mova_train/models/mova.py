"""`MovaModel`: the two video experts, the audio tower and the bridge, and one dual-tower denoising step (spec §6).

Layouts: B batch; video latents [B, 16, T, h, w], I2V conditioning [B, 20, T, h, w] (mask ‖ first-frame latent),
audio latents [B, Ca, L_a], text [B, N, Dt]; tokens [B, L, D].
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from torch import nn

from ..names import AUDIO_DIT, BRIDGE, COMPONENTS, EXPERTS, I2V_MASK_CHANNELS
from .bridge import BridgeConditioner, DualTowerBridge
from .config import MovaConfig, get_model_config
from .dit import DiTBlock, Head, WanAudioDiT, WanVideoDiT, run_block
from .layers import RMSNorm, init_linear_, scaled_add
from .offload import OffloadedForward
from .scheduler import expert_for_timestep
from .sequence import SequenceShard


def build_i2v_condition(first_frame: torch.Tensor) -> torch.Tensor:
    """The I2V condition y [B, 4 + C, T, h, w] = mask(4) ‖ first-frame latent [B, C, T, h, w] (spec §8).

    The mask is 1 on latent frame 0 and 0 elsewhere, in the latent's dtype and device. The one implementation:
    the trainer, the held-out loss and the codecs' `build_i2v_condition` (which checks its input first) call it.
    """
    b, _, t, h, w = first_frame.shape
    mask = torch.zeros(b, I2V_MASK_CHANNELS, t, h, w, dtype=first_frame.dtype, device=first_frame.device)
    mask[:, :, 0] = 1
    return torch.cat([mask, first_frame], dim=1)


def build_component(name: str, config: MovaConfig) -> nn.Module:
    """One diffusion component from the config, on the current default device."""
    if name in EXPERTS:
        return WanVideoDiT(config.video_dit)
    if name == AUDIO_DIT:
        return WanAudioDiT(config.audio_dit)
    if name == BRIDGE:
        return DualTowerBridge(config.dual_tower_bridge)
    raise ValueError(f"unknown component {name!r}; allowed: {', '.join(COMPONENTS)}")


def check_components(components) -> tuple[str, ...]:
    """Validate a component selection (any order, no repeats) and return it in canonical order."""
    if isinstance(components, str):
        components = (components,)
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; allowed: {', '.join(COMPONENTS)}")
    if len(set(components)) != len(components):
        raise ValueError(f"component selection has repeats: {list(components)}")
    if not components:
        raise ValueError("no components selected")
    return tuple(c for c in COMPONENTS if c in components)


class MovaModel(nn.Module):
    """Holds the components that were asked for (the others are None) and runs the dual-tower step."""

    def __init__(self, config: MovaConfig, components=COMPONENTS):
        super().__init__()
        self.config = config
        self.sequence_shard: SequenceShard | None = None  # set_sequence_shard; used by training forwards only
        # set_activation_checkpointing: "layer" or "block" regions, and whether layer regions' inputs go to host
        self.checkpoint_region = "layer"
        self.activation_offload = False
        self.lean = True  # half-precision fused forms (`layers.set_norm_precision`)
        self.offload_stats: dict | None = None  # a dict here counts the offloaded tensors (tests, benchmarks)
        for name in COMPONENTS:
            setattr(self, name, None)
        for name in check_components(components):
            setattr(self, name, build_component(name, config))

    @property
    def components(self) -> tuple[str, ...]:
        """Names of the loaded components."""
        return tuple(c for c in COMPONENTS if getattr(self, c) is not None)

    def expert_for_timestep(self, t: float | torch.Tensor) -> str:
        return expert_for_timestep(t, self.config.boundary_timestep)

    def _component(self, name: str) -> nn.Module:
        module = getattr(self, name, None)
        if module is None:
            raise ValueError(
                f"component {name!r} is not loaded (loaded: {', '.join(self.components) or 'none'})"
            )
        return module

    def _check_inputs(self, video_latents, video_cond, audio_latents, text, tv, ta) -> None:
        cfg = self.config
        b = video_latents.shape[0]
        pt, ph, pw = cfg.video_dit.patch_size

        def fail(msg: str) -> None:
            raise ValueError(f"MovaModel.forward: {msg}")

        if video_latents.dim() != 5 or video_latents.shape[1] != cfg.video_latent_dim:
            fail(
                f"video_latents must be [B, {cfg.video_latent_dim}, T, h, w], got {list(video_latents.shape)}"
            )
        _, _, t, h, w = video_latents.shape
        if t % pt or h % ph or w % pw:
            fail(
                f"video latent grid (T={t}, h={h}, w={w}) must be divisible by the patch size {[pt, ph, pw]}"
            )
        want = [b, cfg.video_cond_dim, t, h, w]
        if list(video_cond.shape) != want:
            fail(f"video_cond must be {want} (mask ‖ first-frame latent), got {list(video_cond.shape)}")
        if audio_latents.dim() != 3 or audio_latents.shape[:2] != (b, cfg.audio_latent_dim):
            fail(f"audio_latents must be [{b}, {cfg.audio_latent_dim}, L], got {list(audio_latents.shape)}")
        if audio_latents.shape[2] < 1:
            fail("audio_latents has no time steps")
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            fail(f"text must be [{b}, N, {cfg.text_dim}], got {list(text.shape)}")
        for name, ts in (("timestep_video", tv), ("timestep_audio", ta)):
            if ts.shape != (b,):
                fail(f"{name} must be a scalar or [{b}], got shape {list(ts.shape)}")

    @staticmethod
    def _timesteps(t, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        return t.expand(batch) if t.dim() == 0 else t.float()

    def forward(
        self,
        video_latents: torch.Tensor,
        video_cond: torch.Tensor,
        audio_latents: torch.Tensor,
        text: torch.Tensor,
        timestep_video: float | torch.Tensor,
        timestep_audio: float | torch.Tensor | None = None,
        expert: str | None = None,
        video_fps: float = 24.0,
        *,
        a2v_scale: float = 1.0,
        v2a_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One dual-tower step -> (pred_video [B, 16, T, h, w], pred_audio [B, Ca, L]) in the towers' dtype.

        `expert` names the video expert to run (`model.expert_for_timestep(t)` picks it); timesteps are per
        sample in [0, 1000]; timestep_audio defaults to timestep_video. `a2v_scale` / `v2a_scale` scale the
        bridge updates (1.0 as released; 0 turns a direction off).

        With a `sequence_shard` set and the model in training mode, every rank of the shard's group gets the same
        inputs and returns the same outputs, but runs the video tower on its own slice of the video tokens (RoPE
        and bridge positions are the slice's rows of the global tables); the audio tower, a few hundred tokens,
        runs whole on every rank. In eval mode (renders, held-out loss on one rank) the full sequence runs here.
        """
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {', '.join(EXPERTS)}, got {expert!r}")
        video_dit = self._component(expert)
        audio_dit = self._component(AUDIO_DIT)
        bridge = self._component(BRIDGE)
        b = video_latents.shape[0]
        device = video_latents.device
        tv = self._timesteps(timestep_video, b, device)
        ta = tv if timestep_audio is None else self._timesteps(timestep_audio, b, device)
        self._check_inputs(video_latents, video_cond, audio_latents, text, tv, ta)

        temb_v, t_mod_v = video_dit.embed_time(tv)  # [B, Dv], [B, 6, Dv]
        temb_a, t_mod_a = audio_dit.embed_time(ta)
        # The same text encoding feeds both towers, each through its own text embedding.
        ctx_v = video_dit.embed_text(text)  # [B, N, Dv]
        ctx_a = audio_dit.embed_text(text)  # [B, N, Da]
        v, grid_v = video_dit.patchify(torch.cat([video_latents, video_cond.to(video_latents.dtype)], dim=1))
        a, grid_a = audio_dit.patchify(audio_latents)  # v [B, Lv, Dv], a [B, La, Da]
        rope_v = video_dit.rope(grid_v, device)
        rope_a = audio_dit.rope(grid_a, device)
        bridge_v, bridge_a = bridge.rope(grid_v, grid_a[0], device, video_fps)
        shard = self.sequence_shard if self.training else None
        if shard is not None:
            part = shard.span(v.shape[1], f"video tokens of grid {list(grid_v)}")
            v = v[:, part]  # [B, Lv/n, Dv]: this rank's tokens
            rope_v = (rope_v[0][part], rope_v[1][part])
            if bridge_v is not None:
                bridge_v = (bridge_v[0][part], bridge_v[1][part])

        num_v, num_a = len(video_dit.blocks), len(audio_dit.blocks)
        a2v, v2a = bridge.audio_to_video_conditioners, bridge.video_to_audio_conditioners

        def layer(i: int, v, a, call):
            """Dual-tower layer i: the bridge exchange, then each tower's block i (v or a None: not touched)."""
            if i < min(num_v, num_a) and bridge.interacts(i):
                # Simultaneous update: both directions read the pre-update states.
                dv = call(a2v[str(i)], v, a, bridge_v, bridge_a)
                da = call(v2a[str(i)], a, v, bridge_a, bridge_v, shard)
                v = scaled_add(v, dv, a2v_scale, self.lean)
                a = scaled_add(a, da.to(a.dtype), v2a_scale, self.lean)
            if i < num_v:
                v = call(video_dit.blocks[i], v, ctx_v, t_mod_v, rope_v, shard)
            if i < num_a:
                a = call(audio_dit.blocks[i], a, ctx_a, t_mod_a, rope_a)
            return v, a

        regions = self.checkpoint_region == "layer" and torch.is_grad_enabled()
        offload = OffloadedForward(self.offload_stats) if regions and self.activation_offload else None
        for i in range(max(num_v, num_a)):
            bridged = i < min(num_v, num_a) and bridge.interacts(i)
            modules = [video_dit.blocks[i]] if i < num_v else []
            modules += [audio_dit.blocks[i]] if i < num_a else []
            modules += [a2v[str(i)], v2a[str(i)]] if bridged else []
            if regions and all(m.activation_checkpointing for m in modules):
                # One region for the whole layer: backward keeps only the streams entering it.
                uses_v, uses_a = bridged or i < num_v, bridged or i < num_a
                with offload.region() if offload is not None else contextlib.nullcontext():
                    out_v, out_a = torch.utils.checkpoint.checkpoint(
                        layer, i, v if uses_v else None, a if uses_a else None, _call, use_reentrant=False
                    )
                v, a = out_v if uses_v else v, out_a if uses_a else a
            else:
                v, a = layer(i, v, a, run_block)  # each flagged module is its own region (or none is)

        out_v = video_dit.head(v, temb_v)  # [B, Lv (or Lv/n), pt*ph*pw*C]
        if shard is not None:
            out_v = shard.gather(out_v)
        pred_video = video_dit.unpatchify(out_v, grid_v)
        pred_audio = audio_dit.unpatchify(audio_dit.head(a, temb_a), grid_a)
        return pred_video, pred_audio


def set_sequence_shard(model: MovaModel, shard: SequenceShard | None) -> None:
    """Run the training forwards of `model` sequence-parallel over `shard`'s group (None: single device again).

    The video self-attention splits its heads over the group (Ulysses), so the video tower's head count must be a
    multiple of the group size; the audio tower is replicated and the bridge only gathers, so theirs need not be.
    """
    if shard is not None and model.config.video_dit.num_heads % shard.size:
        raise ValueError(
            f"parallel.sequence_parallel_size={shard.size} does not divide the video tower's "
            f"num_heads={model.config.video_dit.num_heads} (Ulysses splits the heads over the group)"
        )
    model.sequence_shard = shard


def _call(module: nn.Module, *args):
    return module(*args)


CHECKPOINT_REGIONS = ("layer", "block")


def set_activation_checkpointing(
    model: nn.Module, enabled: bool = True, components=None, *, region: str = "layer", offload: bool = False
) -> int:
    """Flag every tower block and bridge conditioner (of the given components) for activation checkpointing.

    `region="layer"`: MovaModel's step checkpoints each dual-tower layer i (the bridge exchange of layer i, video
    block i, audio block i) as one region when all of that layer's modules are flagged, so backward keeps only
    the two streams entering each layer. `region="block"`, and layers flagged only in part (a `components`
    selection), checkpoint each flagged module alone; a tower run alone always does. `offload=True` keeps the
    layer regions' inputs in host memory (pinned on CUDA) until backward (`offload.py`).

    The flags are read by the block loops, so no hooks or wrappers are installed and PEFT/ZeRO wrapping of the
    components keeps working. Returns the number of flagged modules.
    """
    if region not in CHECKPOINT_REGIONS:
        raise ValueError(f"region must be one of {', '.join(CHECKPOINT_REGIONS)}, got {region!r}")
    if offload and not (enabled and region == "layer"):
        raise ValueError(
            "activation offload keeps the inputs of layer regions: it needs enabled and region='layer'"
        )
    for m in model.modules():
        if isinstance(m, MovaModel):
            m.checkpoint_region = region
            m.activation_offload = bool(offload)
    roots: list[nn.Module] = [model]
    if components is not None:
        roots = [
            getattr(model, c) for c in check_components(components) if getattr(model, c, None) is not None
        ]
    count = 0
    for root in roots:
        for m in root.modules():
            if isinstance(m, (DiTBlock, BridgeConditioner)):
                m.activation_checkpointing = bool(enabled)
                count += 1
    return count


@torch.no_grad()
def init_weights_(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Random init for tests and benchmarks (never a training recipe): PyTorch-default linears, modulations
    ~ N(0, 1/D), norm weights 1 + N(0, 0.1^2) and biases N(0, 0.1^2) so that no parameter is a no-op."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv3d)):
            init_linear_(m, generator)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.normal_(1.0, 0.1, generator=generator)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0.0, 0.1, generator=generator)
        elif isinstance(m, (DiTBlock, Head)):
            m.modulation.normal_(0.0, m.modulation.shape[-1] ** -0.5, generator=generator)
        elif isinstance(m, DualTowerBridge) and hasattr(m, "condition_scale"):
            m.condition_scale.fill_(1.0)


def build_mova(
    config: MovaConfig | str,
    components=COMPONENTS,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> MovaModel:
    """Build the selected components. On `meta` nothing is allocated (use `load_mova` to fill from files);
    on a real device parameters are allocated once there and randomly initialised (deterministic with `seed`)."""
    if isinstance(config, str):
        config = get_model_config(config)
    with torch.device("meta"):
        model = MovaModel(config, components).to(dtype)
    device = torch.device(device)
    if device.type == "meta":
        return model
    model = model.to_empty(device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    init_weights_(model, generator)
    return model
