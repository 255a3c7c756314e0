"""Examples the tests run: a service that embeds the worker agent."""
