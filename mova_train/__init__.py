"""mova-train: LoRA fine-tuning for MOVA. Importing the package drops the third-party banners listed in
`mova_train.upstream.KNOWN_BANNERS` (standard library only), so every entry point and the tests get the same quiet
output."""

from mova_train.upstream import silence_known_banners

silence_known_banners()
