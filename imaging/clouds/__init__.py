"""Where instances come from (00-acquire) and where finished images go (60-publish)."""
