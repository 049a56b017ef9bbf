"""Training side: data preparation, text encoders, teacher/student models, distillation (needs torch)."""
