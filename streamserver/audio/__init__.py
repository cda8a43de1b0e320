"""Audio decoding for live streams: raw PCM and containers (WebM/Ogg Opus, any FFmpeg codec) fed in
pieces as they arrive, out as 16 kHz mono float32."""
