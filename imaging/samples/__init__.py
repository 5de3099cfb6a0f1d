"""The built-in sample instances, built once from Debian packages and cached."""
