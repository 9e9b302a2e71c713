"""A round as Flower messages: the ClientApp and its round, the ServerApp, strategy, validation, recorder, checkpoint,
simulation."""
