"""The names of the MOVA model and of its released checkpoint layout, in one place.

Component names, the experts, the codec names, the file names of the released layout, the I2V condition
layout and the canonical adapter-key pattern. Every other module imports them from here instead of spelling them
again. Standard library only (tests/test_names.py checks it), so that config schemas and command-line tools can
import it without torch.
"""

from __future__ import annotations

import re

# The four diffusion components: checkpoint-folder names and `MovaModel` attributes; the first two are the
# video experts.
HIGH_NOISE_EXPERT = "video_dit"  # runs the timesteps t >= boundary
LOW_NOISE_EXPERT = "video_dit_2"  # runs the timesteps t < boundary
AUDIO_DIT = "audio_dit"
BRIDGE = "dual_tower_bridge"
COMPONENTS = (HIGH_NOISE_EXPERT, LOW_NOISE_EXPERT, AUDIO_DIT, BRIDGE)
EXPERTS = (HIGH_NOISE_EXPERT, LOW_NOISE_EXPERT)
# The components every step runs, whichever expert it picks.
SHARED_COMPONENTS = (AUDIO_DIT, BRIDGE)
# The DiT towers (made of transformer blocks; the bridge holds the cross-tower conditioners).
TOWERS = (HIGH_NOISE_EXPERT, LOW_NOISE_EXPERT, AUDIO_DIT)

# Precision of the norms, RoPE and LoRA inputs (`model.precision`): `lean` keeps no fp32 copy of activations for
# backward (bit-identical to `reference` in fp32), `reference` is the original bf16 behaviour.
PRECISIONS = ("lean", "reference")

# The expert switch of the released model (model_index.json `boundary_ratio`): t >= ratio * 1000 is high-noise.
BOUNDARY_RATIO = 0.9

# The frozen codecs, in the order codecs are loaded and listed. (The codec identity hashes them sorted by name,
# so it does not depend on this order.)
# Attention kernels `model.attention` may name (mova_train.models.layers runs them; auto = the fastest usable one)
ATTENTION_KERNELS = ("auto", "fa3", "fa2", "cudnn", "sdpa")

CODEC_COMPONENTS = ("video_vae", "audio_vae", "text_encoder")
TOKENIZER_DIR = "tokenizer"  # the text encoder's tokenizer files, beside the component folders

# File names of the released layout.
MODEL_INDEX_NAME = "model_index.json"
CONFIG_NAME = "config.json"  # in every component folder
WEIGHTS_NAME = "diffusion_pytorch_model"  # weight file stem of the diffusion components and both VAEs
TEXT_ENCODER_WEIGHTS_NAME = "model"  # weight file stem of the text encoder (transformers naming)
INDEX_SUFFIX = ".safetensors.index.json"  # `<stem>.safetensors.index.json` lists the shards of a component
# Weight file stem of every component folder of the released layout.
COMPONENT_WEIGHTS = {
    **{c: WEIGHTS_NAME for c in COMPONENTS},
    "video_vae": WEIGHTS_NAME,
    "audio_vae": WEIGHTS_NAME,
    "text_encoder": TEXT_ENCODER_WEIGHTS_NAME,
}

# The I2V condition y = mask ‖ first-frame latent (spec §8): the mask has one channel per pixel frame folded into
# a latent frame, 1 on latent frame 0 and 0 elsewhere.
I2V_MASK_CHANNELS = 4

# Canonical adapter keys: `<component>.<module path>.<part>.weight`, part one of LORA_PARTS.
LORA_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")
# Longest name first, so an alternation never stops at a prefix (video_dit of video_dit_2).
_COMPONENT_ALTERNATION = "|".join(re.escape(c) for c in sorted(COMPONENTS, key=len, reverse=True))
_PART_ALTERNATION = "|".join(LORA_PARTS)
ADAPTER_KEY_RE = re.compile(
    rf"^(?P<component>{_COMPONENT_ALTERNATION})\.(?P<path>.+)\.(?P<part>{_PART_ALTERNATION})\.weight$"
)
# The same parameter as PEFT names it inside a (possibly wrapped: "module.", "model." ...) full-model state dict.
PEFT_KEY_RE = re.compile(
    rf"^(?:.*?\.)?(?P<component>{_COMPONENT_ALTERNATION})\."
    rf"(?P<path>.+)\.(?P<part>{_PART_ALTERNATION})\.(?P<adapter>[^.]+)\.weight$"
)


def adapter_key(component: str, path: str, part: str) -> str:
    """The canonical adapter key of `part` (lora_A / lora_B / lora_magnitude_vector) of one module."""
    return f"{component}.{path}.{part}.weight"
