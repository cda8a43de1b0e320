"""Wire protocols: each module is one adapter between a socket and the protocol-free live stream core
(`streamserver.live`): `asr` (WhisperLiveKit's protocol, the contract's), `openai_realtime` (OpenAI's
Realtime API transcription sessions) and `deepgram` (Deepgram's streaming `/v1/listen`)."""
