"""The fine-tuning in plain torch: models, data, methods, the train/eval loop and its meters."""
