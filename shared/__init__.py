"""alertgate's logic: plain async Python that knows nothing of the Functions host."""
