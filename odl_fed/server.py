"""``python -m odl_fed.server``: the fleet's server (the SuperLink entry, :mod:`odl_fed.deploy.superlink`)."""

from odl_fed.deploy.superlink import main

if __name__ == "__main__":
    raise SystemExit(main())
