"""Built-in agent plugins. Each module is an ordinary pluggy plugin, registered
by tornado_app.agents.DEFAULT_PLUGINS exactly as a third-party one would be."""
