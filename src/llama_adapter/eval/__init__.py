"""Evaluation: `scienceqa` (the paper's Table 2 benchmark: loaders, prompts, answer parsing, accuracy by group)."""
