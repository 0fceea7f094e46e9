"""LoRA training of MOVA: objective, loop, checkpoint/resume, distributed plumbing, tracking (`trainer.run`)."""
