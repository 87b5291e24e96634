"""Routing microbatches through stage replicas (GWTF flows). Files are listed as they land."""
