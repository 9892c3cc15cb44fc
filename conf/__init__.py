"""Hydra configs of qat-train and qat-sweep (package data; a package so Hydra finds it with pkg://)."""
