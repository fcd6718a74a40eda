"""Serving shim: loads a bundle (FAISS indexes, exported models) and serves the funnel over HTTP."""
