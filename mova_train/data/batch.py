"""Batches: the `Batch` type, the key that decides which samples may share a batch (bucket, frame count, shapes,
dtypes), the collation of same-key samples (text embeddings zero-padded to text_len), and host->device copies
that never make the host wait (`to_device`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mova_train.data.contract import REQUIRED_TENSORS


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` on `device` (cast to `dtype` when given). A CPU tensor bound for a GPU is copied from pinned memory
    without blocking: a pageable or blocking copy would wait for all queued GPU work, a host sync per call. The
    pinned source is kept alive by torch's caching host allocator until the copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device=device, dtype=dtype, non_blocking=True)
    return t.to(device=device, dtype=dtype)


@dataclass
class Batch:
    """One training batch; every sample in it has the same bucket and shapes."""

    video: torch.Tensor  # [B, 16, T, h, w] normalised video latents
    first_frame: torch.Tensor  # [B, 16, T, h, w] latent of [frame0, grey...] (the I2V condition, no mask)
    audio: torch.Tensor  # [B, Ca, L] DAC latents
    text: torch.Tensor  # [B, text_len, Dt] text embeddings, zero beyond text_lengths
    text_lengths: torch.Tensor  # [B] int64
    keys: list[str]
    bucket: str
    meta: list[dict] = field(default_factory=list)  # the samples' JSON metadata (caption, fps, ...)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move the tensors (and cast the float ones when `dtype` is given); keys and metadata are shared. To a GPU
        the copies are pinned and non-blocking (`to_device`)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return to_device(t, device, dtype if dtype and t.is_floating_point() else None)

        return Batch(
            video=move(self.video),
            first_frame=move(self.first_frame),
            audio=move(self.audio),
            text=move(self.text),
            text_lengths=to_device(self.text_lengths, device),
            keys=self.keys,
            bucket=self.bucket,
            meta=self.meta,
        )


@dataclass
class ParsedSample:
    ref: list  # [stream position j, index in shard, key]
    group: str  # batch-compatibility key: bucket, shapes, dtypes
    meta: dict
    tensors: dict[str, torch.Tensor]


def group_key(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    def shape(name: str) -> str:
        return "x".join(str(d) for d in tensors[name].shape)

    dtypes = ",".join(str(tensors[n].dtype).removeprefix("torch.") for n in REQUIRED_TENSORS)
    # The frame count is in the video shape already; named too, so a (bucket, frames) batch reads as such.
    return (
        f"{meta['bucket']}|frames={meta.get('num_frames')}|video={shape('video')}|first={shape('first_frame')}|audio={shape('audio')}"
        f"|text_dim={tensors['text'].shape[-1]}|{dtypes}"
    )


def build_batch(samples: list[ParsedSample], text_len: int) -> Batch:
    text0 = samples[0].tensors["text"]
    text = torch.zeros(len(samples), text_len, text0.shape[-1], dtype=text0.dtype)  # [B, text_len, Dt]
    lengths = torch.zeros(len(samples), dtype=torch.int64)
    for i, s in enumerate(samples):
        n = s.tensors["text"].shape[0]
        text[i, :n] = s.tensors["text"]
        lengths[i] = n
    return Batch(
        video=torch.stack([s.tensors["video"] for s in samples]),
        first_frame=torch.stack([s.tensors["first_frame"] for s in samples]),
        audio=torch.stack([s.tensors["audio"] for s in samples]),
        text=text,
        text_lengths=lengths,
        keys=[s.ref[2] for s in samples],
        bucket=samples[0].meta["bucket"],
        meta=[s.meta for s in samples],
    )
