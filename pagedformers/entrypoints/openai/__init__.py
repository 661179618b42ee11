"""The OpenAI-compatible server: `build_app` and `run_server` live in server.py."""
