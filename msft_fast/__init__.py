"""msft-fast: a fast multi-task SFT trainer implementing mSFT."""
__version__ = "0.1.0"
