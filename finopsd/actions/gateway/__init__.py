"""The gateway actuator's parts: LiteLLM proxy config edits and where the config lives."""
