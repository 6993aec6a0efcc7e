"""Multi-modal adapters (paper sec. 3.3): `encoder` turns images into frozen global features; `features` computes
and caches them for training data and attaches the learnable projection (eq. 10, in `zero_init_attention`)."""
