"""Task registrations (fairseq imports every module of this folder)."""
