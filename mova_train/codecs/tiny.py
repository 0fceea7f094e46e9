"""Tiny random codecs in the released checkpoint layout, built locally (no downloads), for tests and the demo.

`write_tiny_codecs(out_dir, seed)` writes video_vae/, audio_vae/, text_encoder/ (3 shards + index) and tokenizer/
with the release's file names. The same seed writes byte-identical weight files. The command line is
`python -m mova_train.cli.make_tiny DIR` (a whole checkpoint) or `... --codecs-only` (these folders alone).
"""

from __future__ import annotations

import collections
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
import transformers
from transformers import T5TokenizerFast

from mova_train.checkpoint_io import save_component
from mova_train.codecs.configs import TINY_VOCAB_SIZE, get_codec_config
from mova_train.codecs.dac import DacConfig, build_dac
from mova_train.codecs.text_encoder import EMBED_KEY, TEXT_LEN, build_text_encoder_module
from mova_train.codecs.video_vae import build_video_vae_module
from mova_train.names import TEXT_ENCODER_WEIGHTS_NAME, TOKENIZER_DIR, WEIGHTS_NAME
from mova_train.upstream import t5_tokenizer_from_vocab

# The tiny tokenizer's vocabulary is counted from these caption-like sentences (the kind MOVA is prompted with).
_CORPUS = """
A woman speaks to the camera in a quiet room, her voice calm and clear.
A man plays an acoustic guitar on a wooden porch while birds sing in the trees.
Waves crash against a rocky shore at sunset and seagulls call overhead.
A dog barks twice, then runs across a green field toward a red ball.
Rain falls on a tin roof; thunder rumbles in the distance.
A chef chops onions on a cutting board; the knife taps steadily.
Two children laugh as they splash through puddles in yellow boots.
A train rushes past a crossing, its horn sounding loudly.
An old clock ticks on the wall of a dim library full of books.
A crowd cheers in a stadium as the players run onto the pitch.
A cat purrs softly while sleeping on a sunny windowsill.
The narrator describes a mountain village covered in fresh snow.
A drummer plays a fast rhythm on a small stage under blue lights.
Wind howls through a forest of tall pine trees at night.
A kettle whistles on the stove and steam rises into the kitchen.
A singer performs a slow ballad with a piano accompaniment.
Footsteps echo in an empty hallway as a door creaks open.
A car engine starts, revs, and drives away down a gravel road.
A teacher explains a math problem at the blackboard to the class.
Fireworks burst over the city skyline with loud cracks and booms.
A river flows over smooth stones; water bubbles and gurgles.
A baby giggles while a parent makes funny faces and sounds.
An orchestra tunes its instruments before the concert begins.
A typist works quickly on a mechanical keyboard in an office.
Bees buzz around bright flowers in a summer garden.
A reporter speaks into a microphone in front of a busy street.
A horse gallops along the beach, hooves thudding on wet sand.
Glass shatters on a tiled floor and someone gasps in surprise.
A violinist plays a lively folk tune at an outdoor market.
Leaves rustle as a squirrel climbs quickly up an oak tree.
The camera pans slowly across a desert at dawn, silent except for wind.
A basketball bounces on a wooden court; sneakers squeak.
A man whispers a secret; a woman nods and smiles.
Bells ring from a church tower over a small town square.
A helicopter flies low over the water, its rotor thumping.
Close-up of hands kneading dough; flour dusts the table.
A cyclist rings a bell while riding through a park.
A robot voice announces the next station on a subway platform.
Frogs croak by a pond as the evening light fades.
A saxophone plays smooth jazz in a smoky club.
""".strip().splitlines()


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> T5TokenizerFast:
    """A small Unigram tokenizer over the built-in corpus, wrapped as a T5 tokenizer: <pad>=0, </s>=1, <unk>=2 like
    T5, a trailing </s> on every sequence, 512 tokens max.

    The vocabulary is counted, not trained: the `tokenizers` Unigram trainer is multi-threaded and orders equal-score
    pieces differently from run to run, and the tiny checkpoint must be byte-identical for a given seed.
    Pieces: "▁" + each corpus word (log-frequency score) and every corpus character (so unseen words still split).
    """
    text = " ".join(_CORPUS)
    words = collections.Counter(re.findall(r"\w+", text))
    chars = collections.Counter(c for c in text if not c.isspace())
    total = sum(words.values()) + sum(chars.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", math.log(sum(words.values()) / total))]
    vocab += [(c, math.log(n / total)) for c, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))]
    room = vocab_size - len(vocab)
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:room]
    vocab += [("▁" + w, math.log(n / total)) for w, n in ranked]
    return t5_tokenizer_from_vocab(vocab, model_max_length=TEXT_LEN)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a completed folder into place (the old one, if any, is removed first)."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def write_tiny_codecs(out_dir: Path, seed: int) -> None:
    """Write tiny random video_vae/, audio_vae/, text_encoder/ and tokenizer/ into `out_dir` (about 5 MB).

    Weights come from `seed` only (the caller's RNG state is left untouched). Files are written aside and renamed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        video_cfg = get_codec_config("tiny", "video_vae")
        video = build_video_vae_module(video_cfg)
        audio_cfg = get_codec_config("tiny", "audio_vae")
        audio = build_dac(DacConfig.from_dict(audio_cfg))
        text_cfg = get_codec_config("tiny", "text_encoder")
        text = build_text_encoder_module(text_cfg)

    save_component(
        out_dir / "video_vae",
        video.state_dict(),
        config={**video_cfg, "_diffusers_version": diffusers.__version__},
        weights_name=WEIGHTS_NAME,
    )
    save_component(out_dir / "audio_vae", audio.state_dict(), config=audio_cfg, weights_name=WEIGHTS_NAME)
    # Like transformers' save_pretrained, store the tied embedding once, as shared.weight.
    text_state = {k: v for k, v in text.state_dict().items() if k != EMBED_KEY}
    save_component(
        out_dir / "text_encoder",
        text_state,
        config={**text_cfg, "transformers_version": transformers.__version__},
        weights_name=TEXT_ENCODER_WEIGHTS_NAME,
        num_shards=3,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); tokenizer/ is an ordinary folder
    try:
        build_tiny_tokenizer().save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir / TOKENIZER_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
