"""Ray Serve application with an OpenAI-compatible API (`import_path: raypp.serve:build_app`)."""
from raypp.serve.app import build_app, parse_args

__all__ = ["build_app", "parse_args"]
