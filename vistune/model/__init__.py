"""The model: vision towers, preprocessing, projectors, the LLM, the chat template, and the VLM."""
