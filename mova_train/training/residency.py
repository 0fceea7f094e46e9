"""Expert residency: only the active video expert's frozen weights on the accelerator; the idle one waits in (pinned,
with CUDA) host memory and is copied in when the objective's expert chooser switches to it.

MOVA has two video experts of the same architecture (14B each at full size) and a micro-step runs one of them.
Frozen weights never change, so every expert's frozen weights keep one host copy for the whole run: a switch drops
the old expert's device copy (nothing is copied back) and copies the new one in. With CUDA the copy runs on a side
stream, one event per module that owns frozen weights, and a forward pre-hook on each such module makes the compute
stream wait for its own weights only: the first blocks compute while the later ones are still in transit. On other
devices (CPU, `meta`, the planner's fake `cuda`) the same code makes plain copies. LoRA parameters (a few MB) stay
on the accelerator, where the optimizer and DDP hold them; only the frozen base moves.

Not used under ZeRO-3, where DeepSpeed holds each expert's partitions (on the device, or on the host with
`offload_param`) and gathers an expert only when its modules run; see `invalidate_zero3_trace_on_switch`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mova_train.models.streaming import is_streamed
from mova_train.names import EXPERTS
from mova_train.training.config import ObjectiveConfig
from mova_train.training.objective import ExpertChooser

logger = logging.getLogger(__name__)


def objective_experts(objective: ObjectiveConfig) -> tuple[str, ...]:
    """The video experts the objective runs (and so loads): one with `only:<expert>`, else both."""
    mode = objective.expert
    return (mode.split(":", 1)[1],) if mode.startswith("only:") else EXPERTS


def keeps_idle_expert_on_host(objective: ObjectiveConfig, *, zero_stage: int = 0) -> bool:
    """Whether a run of this objective keeps an idle expert in host memory (ExpertResidency applies): two experts,
    `objective.idle_expert=host`, and not ZeRO-3 (DeepSpeed places partitions itself)."""
    return len(objective_experts(objective)) == 2 and objective.idle_expert == "host" and zero_stage != 3


def resident_experts(objective: ObjectiveConfig, *, zero_stage: int = 0, seed: int = 0) -> tuple[str, ...]:
    """The video experts whose frozen weights are on the accelerator during a micro-step (the first one's, for
    the planner): the active one only when the idle one waits on the host, else every expert the run loads. Under
    ZeRO-3 that is each loaded expert's partition (1/world of it, or none with `offload_param`), gathered in full
    only for the active expert while its modules run."""
    if keeps_idle_expert_on_host(objective, zero_stage=zero_stage):
        return (ExpertChooser(objective, seed).expert(0),)
    return objective_experts(objective)


def _point(p: nn.Parameter, tensor: torch.Tensor) -> None:
    """Make parameter `p` hold `tensor`, keeping its identity (the optimizer and the hooks hold `p`): `p.data = `,
    or, between device types whose tensors cannot share a Python object (CPU and `meta`), a swap of contents."""
    try:
        p.data = tensor
    except RuntimeError:
        torch.utils.swap_tensors(p, nn.Parameter(tensor, requires_grad=p.requires_grad))


class ExpertResidency:
    """Keeps the frozen weights of `experts` (components of `model`) in host memory and the active one's on
    `device`; everything else of the model (the other components, every LoRA parameter, buffers) goes to `device`.

    `place()` once before the model is wrapped (DDP, accelerate); `install()` adds the hooks that make a forward of
    the model activate the expert it names (the trainer's micro-steps, the evaluator's renders and held-out loss).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, experts: tuple[str, ...] = EXPERTS):
        self.model = model
        self.device = torch.device(device)
        self.streams = self.device.type == "cuda" and torch.cuda.is_available()
        self.side = torch.cuda.Stream(self.device) if self.streams else None
        # expert -> [(module, [its own frozen parameters])] in the order a forward uses them, which is the order
        # of the copies: the embeddings (small), the blocks in turn, then the head
        self.owners: dict[str, list[tuple[nn.Module, list[nn.Parameter]]]] = {}
        for name in experts:
            owners = []
            for path, module in getattr(model, name).named_modules():
                # streamed blocks (model.offload_blocks) live on the host already: their streamer moves them
                own = [
                    p for p in module.parameters(recurse=False) if not p.requires_grad and not is_streamed(p)
                ]
                if own:
                    rank = 1 if path.startswith("blocks.") else 2 if path.startswith("head") else 0
                    owners.append((rank, len(owners), module, own))
            self.owners[name] = [(module, own) for _, _, module, own in sorted(owners, key=lambda x: x[:2])]
        self.host: dict[int, torch.Tensor] = {}  # id(parameter) -> its host copy
        self.pending: dict[int, object] = {}  # id(module) -> the event its weights' copy records (CUDA)
        self.active: str | None = None
        self.hooks: list = []
        self.swaps = 0  # experts copied in so far (a figure for logs and tests)

    def frozen(self, expert: str) -> list[nn.Parameter]:
        return [p for _, params in self.owners[expert] for p in params]

    def place(self) -> None:
        """Every parameter and buffer on the device, except the experts' frozen weights: host copies (pinned with
        CUDA), which the parameters point at until their expert is activated. DDP is told to ignore them: they
        are frozen and equal on every rank (read from one checkpoint), and DDP wants one device type."""
        frozen = {id(p) for e in self.owners for p in self.frozen(e)}
        for p in self.model.parameters():
            if id(p) not in frozen:
                _point(p, p.data.to(self.device))
        for module in self.model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(self.device)
        for expert in self.owners:
            for p in self.frozen(expert):
                host = p.data.to("cpu")
                if self.streams:
                    host = host.pin_memory()
                self.host[id(p)] = host
                _point(p, host)
        self.model._ddp_params_and_buffers_to_ignore = [
            n for n, p in self.model.named_parameters() if id(p) in frozen
        ]
        self.active = None

    def activate(self, expert: str) -> None:
        """Make `expert` the one on the device: the previous one's device copy is released (its host copy stays)
        and `expert`'s weights are copied in (asynchronously with CUDA; the modules' hooks wait for them)."""
        if expert == self.active or expert not in self.owners:
            return
        if self.side is not None:  # copies whose module never ran: done before their memory is released
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.pending.clear()
        if self.active is not None:
            # The device copies are freed once the queued kernels that read them ran; the host copies stay.
            for p in self.frozen(self.active):
                _point(p, self.host[id(p)])
        self.active = expert
        self.swaps += 1
        if self.side is None:
            for p in self.frozen(expert):
                _point(p, self.host[id(p)].to(self.device, copy=True))
            return
        compute = torch.cuda.current_stream(self.device)
        # Copies start after the kernels already queued (those that read the memory just released, which the
        # new copies may reuse: they are allocated on the compute stream, so the allocator reuses its blocks).
        self.side.wait_stream(compute)
        for module, params in self.owners[expert]:
            for p in params:
                host = self.host[id(p)]
                dst = torch.empty_like(host, device=self.device)
                with torch.cuda.stream(self.side):
                    dst.copy_(host, non_blocking=True)
                p.data = dst
            event = torch.cuda.Event()
            event.record(self.side)
            self.pending[id(module)] = event

    def _wait_for_weights(self, module: nn.Module, args) -> None:
        event = self.pending.pop(id(module), None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _activate_for_forward(self, model: nn.Module, args, kwargs) -> None:
        # MovaModel.forward(video, cond, audio, text, t_video, t_audio=None, expert=None, ...)
        expert = kwargs.get("expert", args[6] if len(args) > 6 else None)
        if expert is not None:
            self.activate(expert)

    def install(self) -> None:
        """Hooks: a forward of the model activates the expert it names; with CUDA, each module that owns frozen
        expert weights waits for their copy before it runs."""
        self.hooks.append(self.model.register_forward_pre_hook(self._activate_for_forward, with_kwargs=True))
        if self.side is not None:
            for owners in self.owners.values():
                for module, _ in owners:
                    self.hooks.append(module.register_forward_pre_hook(self._wait_for_weights))

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def device_bytes(self) -> dict[str, int]:
        """Bytes of each expert's frozen weights now on the device (0 for the idle one)."""
        return {
            e: sum(p.numel() * p.element_size() for p in self.frozen(e) if p.device == self.device)
            for e in self.owners
        }


def build_residency(
    model: nn.Module, device: torch.device, objective: ObjectiveConfig, *, zero_stage: int
) -> ExpertResidency | None:
    """The residency manager for this run, placed and hooked, or None where it does not apply (one expert,
    `objective.idle_expert=device`, ZeRO-3, or a CPU device, where host memory is the device)."""
    experts = tuple(e for e in objective_experts(objective) if getattr(model, e, None) is not None)
    if len(experts) < 2 or not keeps_idle_expert_on_host(objective, zero_stage=zero_stage):
        return None
    if torch.device(device).type == "cpu":
        return None
    residency = ExpertResidency(model, device, experts)
    residency.place()
    residency.install()
    held = sum(t.numel() * t.element_size() for t in residency.host.values())
    logger.info(
        "expert residency: %.2f GB of frozen expert weights in %s host memory; the active expert's are copied "
        "to %s when the chooser switches", held / 1e9, "pinned" if residency.streams else "pageable", device,
    )  # fmt: skip
    return residency
