"""Evaluation: Full-Duplex-Bench (run, transcribe, score, report) and a service-persona adherence benchmark."""
