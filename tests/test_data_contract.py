"""The shard contract: sample serialisation, validation errors, manifest round trip."""

import json

import pytest
import torch

from mova_train.data.contract import (
    SCHEMA_VERSION,
    Manifest,
    SampleSpec,
    ShardFormatError,
    ShardInfo,
    decode_sample,
    encode_sample,
    load_manifest,
    parse_bucket,
    save_manifest,
    validate_sample,
)


def _clip(num_frames=17, h=32, w=48, samples=33_000, text_dim=32, identity="abc"):
    meta = {
        "clip_id": "src_0001-000",
        "source": "videos/a.mp4",
        "start_s": 0.0,
        "end_s": num_frames / 24,
        "fps": 24.0,
        "num_frames": num_frames,
        "height": h,
        "width": w,
        "bucket": f"{h}x{w}",
        "audio_sample_rate": 48000,
        "num_audio_samples": samples,
        "audio_offset_s": 0.0,
        "caption": "a dog barks",
        "content_sha256": "0" * 64,
        "codec_identity": identity,
        "data_tools_version": "0.1.0",
        "schema_version": SCHEMA_VERSION,
    }
    t_lat = (num_frames - 1) // 4 + 1
    g = torch.Generator().manual_seed(0)
    tensors = {
        "video": torch.randn(16, t_lat, h // 8, w // 8, generator=g),
        "first_frame": torch.randn(16, t_lat, h // 8, w // 8, generator=g),
        "audio": torch.randn(128, -(-samples // 960), generator=g),
        "text": torch.randn(7, text_dim, generator=g).to(torch.bfloat16),
    }
    return meta, tensors


SPEC = SampleSpec(text_dim=32, codec_identity="abc")


def test_round_trip_is_exact_and_deterministic():
    meta, tensors = _clip()
    raw = encode_sample(meta, tensors)
    assert raw["__key__"] == "src_0001-000"
    assert encode_sample(meta, tensors) == raw
    meta2, tensors2 = decode_sample(raw, where="shard-000-00000.tar")
    assert meta2 == meta
    for k, v in tensors.items():
        assert torch.equal(tensors2[k], v) and tensors2[k].dtype == v.dtype
    validate_sample(meta2, tensors2, expect=SPEC)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m, t: t.__setitem__("video", t["video"][:, :-1]), "video latent shape"),
        (lambda m, t: t.__setitem__("audio", t["audio"][:, :-1]), "audio latent shape"),
        (lambda m, t: t.__setitem__("text", torch.zeros(3, 8)), "text embedding shape"),
        (lambda m, t: t["audio"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda m, t: t.pop("first_frame"), "lack"),
        (lambda m, t: t.__setitem__("video", t["video"].double()), "dtype"),
        (lambda m, t: m.pop("caption"), "lacks 'caption'"),
        (lambda m, t: m.__setitem__("codec_identity", "zzz"), "re-encode"),
        (lambda m, t: m.__setitem__("bucket", "1x1"), "bucket"),
        (lambda m, t: m.__setitem__("schema_version", 99), "schema_version"),
    ],
)
def test_validation_names_the_problem(mutate, message):
    meta, tensors = _clip()
    mutate(meta, tensors)
    with pytest.raises(ShardFormatError, match=message) as e:
        validate_sample(meta, tensors, expect=SPEC, where="shard-x.tar")
    assert "src_0001-000" in str(e.value) and "shard-x.tar" in str(e.value)


def test_corrupt_members_are_refused_without_unpickling():
    meta, tensors = _clip()
    raw = encode_sample(meta, tensors)
    with pytest.raises(ShardFormatError, match="missing member"):
        decode_sample({"__key__": "k", "json": raw["json"]})
    with pytest.raises(ShardFormatError, match="not UTF-8 JSON"):
        decode_sample({**raw, "json": b"\xff\xfe"})
    with pytest.raises(ShardFormatError, match="not a valid safetensors"):
        decode_sample({**raw, "latents.safetensors": raw["latents.safetensors"][:40]})
    with pytest.raises(ShardFormatError, match="clip_id"):
        encode_sample({**meta, "clip_id": "bad key/../x"}, tensors)


def test_manifest_round_trip_and_strictness(tmp_path):
    m = Manifest(
        codec_identity="abc",
        checkpoint_identity="def",
        num_samples=2,
        shards=[ShardInfo(name="shard-000-00000.tar", sha256="1" * 64, num_samples=2, num_bytes=10)],
        buckets={"32x48": 2},
        text_dim=32,
    )
    save_manifest(tmp_path, m)
    assert load_manifest(tmp_path) == m
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["num_sampels"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match="unknown field.*num_sampels"):
        load_manifest(tmp_path)
    with pytest.raises(ShardFormatError, match="no manifest.json"):
        load_manifest(tmp_path / "missing")


def test_parse_bucket():
    assert parse_bucket("352x640") == (352, 640)
    with pytest.raises(ValueError, match="HxW"):
        parse_bucket("352*640")
