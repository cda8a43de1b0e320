"""Live streams, whatever protocol they come in on: the stream core (admission, the session on the
device scheduler, release), the session (VAD, streaming policy, attribution), and the caption state
it produces, which each protocol adapter renders in its own wire format."""
