"""Training: the LightningModule, callbacks and run orchestration."""
