"""Ways to run the engine from outside Python: the command line, batch files, the HTTP server (they import the engine, never the reverse)."""
