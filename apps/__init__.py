"""Science campaigns built on tpmflow."""
