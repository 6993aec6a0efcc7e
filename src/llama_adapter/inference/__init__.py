"""Decoding: `sampling` (settings and the sampler), `text_stream` (token ids to UTF-8-safe text, stop strings),
`prompt_cache` (each adapter's prompt K/V, projected once), `decoder` (`BatchDecoder`: continuous batching over
many adapters at once), `generate` (the offline API) and `chat` (the prompt text of a conversation)."""
