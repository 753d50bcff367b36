"""Ways to run the engine from outside Python: the command line, batch files, (later) a server."""
