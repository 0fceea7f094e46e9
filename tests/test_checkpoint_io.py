"""Strict safetensors IO: round trips, sharding, and the errors a user sees for broken checkpoint folders."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mova_train.checkpoint_io import (
    CheckpointError,
    encode_safetensors,
    load_component_state,
    load_module_strict,
    read_component_header,
    read_json,
    read_safetensors_header,
    save_component,
)
from mova_train.names import WEIGHTS_NAME as NAME


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))


@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_on_meta_is_exact(tmp_path, num_shards):
    net = _net()
    save_component(tmp_path, net.state_dict(), config={"a": 1}, weights_name=NAME, num_shards=num_shards)
    with torch.device("meta"):
        fresh = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
    load_module_strict(fresh, tmp_path, weights_name=NAME)
    for (k, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert b.device.type == "cpu", k
        assert torch.equal(a, b), k
    assert read_json(tmp_path / "config.json") == {"a": 1}
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if num_shards == 1:
        assert files == [f"{NAME}.safetensors"]
    else:
        assert files == [f"{NAME}-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        index = json.loads((tmp_path / f"{NAME}.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(net.state_dict())
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in net.state_dict().values())


def test_saving_twice_is_byte_identical(tmp_path):
    net = _net()
    for d in ("a", "b"):
        save_component(tmp_path / d, net.state_dict(), config=None, weights_name=NAME, num_shards=2)
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


def test_dtype_cast_and_header_only_read(tmp_path):
    net = _net()
    save_component(tmp_path, net.state_dict(), config=None, weights_name=NAME)
    header = read_component_header(tmp_path, weights_name=NAME)
    assert header["0.weight"] == ((5, 4), "float32")
    state = load_component_state(tmp_path, weights_name=NAME, dtype=torch.bfloat16)
    assert state["2.bias"].dtype == torch.bfloat16


def test_shape_mismatch_names_key_file_and_shapes(tmp_path):
    save_component(tmp_path, _net().state_dict(), config=None, weights_name=NAME, num_shards=2)
    with torch.device("meta"):
        wrong = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(5, 3))
    with pytest.raises(CheckpointError, match=r"0\.weight in .*00001-of-00002.*\[5, 4\].*\[6, 4\]"):
        load_module_strict(wrong, tmp_path, weights_name=NAME, component="video_dit")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = _net().state_dict()
    sd.pop("2.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_component(tmp_path, sd, config=None, weights_name=NAME)
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
    with pytest.raises(CheckpointError) as e:
        load_module_strict(net, tmp_path, weights_name=NAME)
    assert "missing key(s): 2.bias" in str(e.value)
    assert "unexpected key(s): extra.weight" in str(e.value)


def test_truncated_shard_and_missing_shard(tmp_path):
    save_component(tmp_path, _net().state_dict(), config=None, weights_name=NAME, num_shards=2)
    shard = tmp_path / f"{NAME}-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_component_header(tmp_path, weights_name=NAME)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing shard file .*00002-of-00002"):
        read_component_header(tmp_path, weights_name=NAME)


def test_header_reader_gives_the_stored_bytes_and_the_data_offset(tmp_path):
    path = tmp_path / "t.safetensors"
    data = encode_safetensors({"x": torch.arange(6.0).reshape(2, 3), "y": torch.ones(2)}, {"k": "v"})
    path.write_bytes(data)
    header = read_safetensors_header(path)
    n = int.from_bytes(data[:8], "little")
    assert header.raw == data[8 : 8 + n] and header.data_start == 8 + n and header.file_size == len(data)
    assert header.entries == json.loads(header.raw)
    assert header.entries["__metadata__"] == {"k": "v"} and header.entries["x"]["shape"] == [2, 3]
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(path)


def test_garbage_file_and_missing_folder(tmp_path):
    (tmp_path / f"{NAME}.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a safetensors file|corrupt"):
        read_component_header(tmp_path, weights_name=NAME)
    with pytest.raises(CheckpointError, match="missing component folder"):
        read_component_header(tmp_path / "nope", weights_name=NAME)
    (tmp_path / "cfg.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        read_json(tmp_path / "cfg.json")


def test_tied_names_may_be_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Embedding(7, 3)
            self.embed = self.shared  # the same parameter under two names, as UMT5 does

    ref = Tied()
    save_file({"shared.weight": ref.shared.weight.detach().clone()}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        m = Tied()
    load_module_strict(m, tmp_path, weights_name="model", tied={"embed.weight": "shared.weight"})
    assert torch.equal(m.embed.weight, ref.shared.weight)
    assert m.embed.weight is m.shared.weight
