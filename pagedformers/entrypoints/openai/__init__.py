"""The OpenAI-compatible server: `build_app` and `run_server` live in server.py. The limits' defaults live here, so
that the CLI can name them without importing the server."""

DEFAULT_MAX_WAITING_REQUESTS = 1024  # requests in flight beyond max_num_seqs before a 503
DEFAULT_MAX_BODY_BYTES = 16 << 20  # a request body larger than this gets a 413
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")  # --tool-call-parser: the formats tool_calls.py parses
