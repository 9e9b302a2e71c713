"""``python -m odl_fed.client``: a board joins a fleet (the SuperNode entry, :mod:`odl_fed.deploy.supernode`)."""

from odl_fed.deploy.supernode import main

if __name__ == "__main__":
    raise SystemExit(main())
