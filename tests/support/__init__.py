"""What the tests share: local hub servers and clients, fixture models, a running OpenAI server, asserts."""
