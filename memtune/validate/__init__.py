"""Check plans against reality: a few instrumented training steps on the GPU."""
