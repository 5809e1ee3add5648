"""Training-data attribution: TracIn, embedding similarity and BM25 behind one `rank(queries, corpus)` interface, and
the FTRACE-style benchmark."""
