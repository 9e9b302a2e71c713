"""odl-fed: federated on-device fine-tuning under a memory budget, with ASI shortcut backprop."""

__version__ = "0.1.0"
