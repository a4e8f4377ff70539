"""Configuration: argument dataclasses, the PaddleNLP-compatible flag parser, presets and early validation."""
