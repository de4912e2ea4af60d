"""tollgate gateway: the OpenAI-compatible front door in front of vLLM."""
