//! ensueno's HTTP server (under construction).
