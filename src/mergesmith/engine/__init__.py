"""Execution: stream the plan through read -> merge -> write with bounded memory."""
