"""Training on the platform's own model code: pretraining, SFT, DPO, full or LoRA, on Ray Train."""
