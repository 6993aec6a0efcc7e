"""Multi-modal adapters (paper sec. 3.3, widened to audio and video): `modalities` is the one encoder interface;
`encoder` (images, CLIP), `audio` (Whisper / CLAP) and `video` (frames through the image encoder) turn inputs into
frozen global features; `features` computes and caches them for training data and attaches the learnable
projection (eq. 10, in `zero_init_attention`); `media` reads any input from a path, bytes or a data URL."""
