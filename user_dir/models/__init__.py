"""Model and architecture registrations (fairseq imports every module of this folder)."""
