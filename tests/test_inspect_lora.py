"""`python -m mova_train.cli.inspect --lora`: targeted modules and trainable counts at real size, on meta."""

import re

from mova_train.cli.inspect import main


def test_inspect_lists_lora_targets_at_real_size(capsys):
    assert main(["--config", "mova_360p", "--lora", "voice_lora"]) == 0
    out = capsys.readouterr().out.split("LoRA rank", 1)[1]
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3).replace(",", "")))
        for m in re.finditer(
            r"^(audio_dit|dual_tower_bridge|video_dit_2|video_dit)\s+(\d+)\s+([\d,]+)\s", out, re.M
        )
    }
    # voice_lora: audio tower + bridge + the low-noise expert's attention, never the high-noise expert.
    assert set(rows) == {"audio_dit", "dual_tower_bridge", "video_dit_2"}
    rank = 16
    # low-noise expert: 40 blocks x (self q,k,v,o + cross q,k,v,o), each 5120x5120 -> r*(in+out)
    assert rows["video_dit_2"] == (320, 320 * rank * (5120 + 5120))
    # bridge: 30 a2v (q,o 5120x5120; k,v 1536->5120) + 30 v2a (q,o 1536x1536; k,v 5120->1536)
    a2v = 2 * rank * (5120 + 5120) + 2 * rank * (1536 + 5120)
    v2a = 2 * rank * (1536 + 1536) + 2 * rank * (5120 + 1536)
    assert rows["dual_tower_bridge"] == (240, 30 * (a2v + v2a))


def test_inspect_unknown_lora_name_is_a_clear_error(capsys):
    assert main(["--config", "tiny", "--lora", "no_such_preset"]) == 2
    assert "no_such_preset" in capsys.readouterr().err
