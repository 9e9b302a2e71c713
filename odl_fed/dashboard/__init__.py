"""The round log, read: summaries, the console, TensorBoard, the report."""
