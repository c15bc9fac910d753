"""Planning: every output tensor with its sources, method, parameters, shape and dtype, before any compute."""
