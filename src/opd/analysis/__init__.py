"""What a training run's own files say about it (`opd analyze`)."""
