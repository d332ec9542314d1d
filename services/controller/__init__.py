"""The training-job controller service (files, fine-tuning jobs, executors, durable job store)."""
